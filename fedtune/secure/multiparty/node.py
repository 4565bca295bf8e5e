"""A client's side of a multiparty round (docs/multiparty.md, "A round in the federation").

Three calls from :mod:`fedtune.node.verified` when the node's codec is a
:class:`~fedtune.secure.multiparty.backend.MultipartyCodec`:

* :func:`sign` an upload with the party's Ed25519 key (instead of the shared HMAC tag);
* :func:`ready_reply` to the server's liveness probe (a ``ready`` record) before it
  picks a round's quorum: a fixed reply, nothing computed from a secret;
* :func:`partial_reply` to the server's decryption request (a ``decrypt`` record): the
  party's checks, then one signed, smudged partial decryption per round, kept in the
  party's on-disk round log (:class:`~fedtune.secure.multiparty.files.RoundLog`)
  before it leaves;
* :func:`open_record` before a global is used: the receipts, the quorum's signatures and
  the sum's ``c1`` are checked, the partials combined here, and the opened sum kept in the
  codec (its ``decode``); a global without valid signed partials is refused with a fixed
  code and never decoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedtune.errors import GlobalRefused
from fedtune.guard import payload_digest
from fedtune.secure.codec import WirePayload
from fedtune.secure.multiparty import rounds
from fedtune.secure.multiparty.backend import MultipartyCodec
from fedtune.secure.multiparty.files import keep_round_log
from fedtune.secure.multiparty.protocol import SIGNATURE_BYTES, DecryptionRequest
from fedtune.secure.verify import MALFORMED, UsedGlobals, receipts_from_record

__all__ = ["open_record", "partial_reply", "ready_reply", "request_from_record", "sign"]

_TAG_KEY = "tag"


def sign(
    codec: MultipartyCodec, payload: WirePayload, *, server_round: int, num_examples: int
) -> WirePayload:
    """``payload`` with the party's Ed25519 signature in its ``tag`` field."""
    body = {k: payload[k] for k in ("chunks", "length", "fingerprint")}
    tag = codec.party.sign(body, server_round=server_round, num_examples=num_examples)
    return {**payload, _TAG_KEY: tag}


def request_from_record(record: Mapping[str, object]) -> DecryptionRequest:
    """The decryption request a ``decrypt`` (or ``global``) record carries."""
    items = receipts_from_record(record, tag_bytes=SIGNATURE_BYTES)
    rnd, total, quorum = record.get("mp-round"), record.get("num-examples"), record.get("mp-quorum")
    if (
        type(rnd) is not int
        or type(total) is not int
        or not isinstance(quorum, list)
        or not all(isinstance(q, str) for q in quorum)
    ):
        raise GlobalRefused(MALFORMED)
    return DecryptionRequest(rnd, tuple(items), total, tuple(quorum))


def ready_reply(codec: MultipartyCodec) -> RecordDict:
    """The reply to a ``ready`` probe: the party's name (public) and a constant."""
    return RecordDict({"info": ConfigRecord({"client": codec.party.name, "ready": 1})})


def partial_reply(
    codec: MultipartyCodec, content: RecordDict, *, min_count: int, rounds_dir: Path | None
) -> RecordDict:
    """The reply to a ``decrypt`` message: this party's signed partial, or a refusal code.

    ``rounds_dir``: where the party keeps its round log (one answer per round, across
    restarts); ``None`` keeps it in memory (tests of the protocol only).
    """
    if rounds_dir is not None:
        keep_round_log(codec.party, rounds_dir)
    record = content.config_records["decrypt"]
    request = request_from_record(record)
    signed = rounds.answer(codec.party, request, min_count=min_count)
    return RecordDict(
        {
            "info": ConfigRecord({"client": codec.party.name}),
            "partial": ConfigRecord(
                {
                    "name": signed.partial.name,
                    "signature": signed.signature,
                    "chunks": list(signed.partial.chunks),
                }
            ),
        }
    )


def open_record(
    codec: MultipartyCodec,
    record: Mapping[str, object],
    payload: WirePayload,
    num_examples: int,
    *,
    run: str,
    server_round: int,
    min_count: int,
    used: UsedGlobals,
) -> None:
    """Check and open round ``server_round``'s global; keep the sum in ``codec``.

    Raises
    ------
    GlobalRefused
        With a fixed code: no or malformed receipts or partials, a receipt or partial
        signature that does not verify, a ``c1`` that is not the listed seeds', a round
        other than ``server_round``, or a second, different global for this round.
    """
    roster = codec.roster
    items = receipts_from_record(record, tag_bytes=SIGNATURE_BYTES)
    request, partials = rounds.partials_from_record(
        roster, record, receipts=items, num_examples=num_examples
    )
    if request.server_round != server_round:
        raise GlobalRefused(MALFORMED)
    total = rounds.open_global(roster, payload, request, partials, min_count=min_count)
    used.claim(f"{run}/{server_round}", request.digest(roster).hex() + payload_digest(payload))
    codec.remember(payload, total)
