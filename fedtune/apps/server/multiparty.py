"""The server's decryption step of ``ckks-multiparty`` (docs/multiparty.md).

After a round's uploads are summed, :func:`decryption_step` sends one ``decrypt`` message
(receipts, count, round, quorum) to each of ``t`` key holders that uploaded in the round,
checks each signed partial decryption against the roster, and attaches the quorum and the
partials to the global record every later message carries
(:attr:`FedTuneStrategy.global_extra`): the clients combine and check them themselves. The
server combines too (:func:`open_sum`, export) and so sees the round's sum, as with secure
aggregation. It also keeps the partials and the receipts of the checkpointed round in
``RUN_DIR/multiparty-global.json`` so that ``fedtune export`` opens the checkpoint without
any key and without a second decryption.

A sum with an upload whose signature fails is refused by honest holders before they compute
anything, naming its position: the upload is dropped (as in
:mod:`fedtune.apps.server.verified`) and the quorum asked again. Not wired: asking another
quorum when a holder drops out; a resumed multiparty run is refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.apps.server.exchange import exchange
from fedtune.apps.server.replies import stated_name
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.apps.server.verified import UNAUTHENTIC, drop_uploads, refused_positions
from fedtune.errors import FederationError
from fedtune.secure.multiparty import rounds
from fedtune.secure.multiparty.backend import MultipartyServerCodec
from fedtune.secure.multiparty.global_file import (
    GLOBAL_FILE,
    load_global_record,
    write_global_record,
)
from fedtune.secure.multiparty.protocol import PartialDecryption, Roster
from fedtune.secure.verify import receipts_to_record

__all__ = ["GLOBAL_FILE", "decryption_step", "load_global_record"]

log = logging.getLogger("fedtune.server")


def _partial(reply: Message) -> rounds.SignedPartial | None:
    if reply.has_error() or "partial" not in reply.content.config_records:
        return None
    rec = reply.content.config_records["partial"]
    name, sig, chunks = rec.get("name"), rec.get("signature"), rec.get("chunks")
    if (
        not isinstance(name, str)
        or not isinstance(sig, bytes)
        or not isinstance(chunks, list)
        or not all(isinstance(c, bytes) for c in chunks)
    ):
        return None
    parts = tuple(c for c in chunks if isinstance(c, bytes))
    return rounds.SignedPartial(PartialDecryption(name, b"", parts), sig)


def decryption_step(
    grid: Grid,
    strategy: FedTuneStrategy,
    train_replies: Sequence[Message],
    *,
    server_round: int,
    timeout: float,
    run_dir: Path,
) -> None:
    """Ask a quorum for round ``server_round``'s partial decryptions; attach them.

    Raises
    ------
    FederationError
        If fewer than ``t`` uploaders are reachable, or a quorum member gives no valid
        signed partial for another reason than uploads the quorum agrees to drop.
    """
    codec = strategy.codec
    assert isinstance(codec, MultipartyServerCodec)
    roster: Roster = codec.roster
    nodes: dict[str, int] = {}
    for msg in train_replies:
        name = stated_name(msg)
        if name is not None and not msg.has_error():
            nodes.setdefault(name, msg.metadata.src_node_id)
    # Each pass either ends the step or drops at least one upload the quorum named.
    for _ in range(len(strategy.global_receipts) + 1):
        quorum = sorted(r.name for r in strategy.global_receipts if r.name in nodes)
        quorum = quorum[: roster.threshold]
        if len(quorum) < roster.threshold:
            raise FederationError(
                f'Round {server_round}: `encryption-backend` = "ckks-multiparty" needs '
                f"{roster.threshold} key holders to decrypt the sum; {len(quorum)} uploaded "
                "verified updates. Stopping; run with more clients per round."
            )
        got, votes = _ask(grid, strategy, nodes, quorum, server_round=server_round, timeout=timeout)
        if len(got) == len(quorum):
            break
        # Honest holders refuse, before computing anything, a sum with an upload whose
        # signature fails, naming its position: drop what a strict majority of the
        # quorum named and ask again (they answered nothing for this round yet).
        n_receipts = len(strategy.global_receipts)
        agreed = {i for i, v in votes.items() if 2 * v > len(quorum) and i < n_receipts}
        if not drop_uploads(strategy, agreed, server_round, UNAUTHENTIC):
            missing = sorted(set(quorum) - set(got))
            raise FederationError(
                f"Round {server_round}: key holder(s) {missing} sent no valid signed partial "
                'decryption (`encryption-backend` = "ckks-multiparty"; asking another quorum '
                "is not wired). Stopping; the previous checkpoint is kept."
            )
    request = rounds.DecryptionRequest(
        server_round, tuple(strategy.global_receipts), strategy.global_examples, tuple(quorum)
    )
    digest = request.digest(roster)
    partials = []
    for name in quorum:
        p = got[name].partial
        signed = rounds.SignedPartial(
            PartialDecryption(name, digest, p.chunks), got[name].signature
        )
        if not rounds.verify_partial(roster, signed):
            raise FederationError(
                f"Round {server_round}: the partial decryption of key holder {name!r} is not "
                "signed by its roster key for this round's request. Stopping; the previous "
                "checkpoint is kept."
            )
        partials.append(signed)
    strategy.global_extra = rounds.partials_to_record(request, partials)
    save_global_record(run_dir, strategy)


def _ask(
    grid: Grid,
    strategy: FedTuneStrategy,
    nodes: Mapping[str, int],
    quorum: Sequence[str],
    *,
    server_round: int,
    timeout: float,
) -> tuple[dict[str, rounds.SignedPartial], Counter[int]]:
    """One ``decrypt`` message per quorum member: the partials, and the positions refused."""
    record: dict[str, Any] = {
        **receipts_to_record(strategy.global_receipts),
        "num-examples": strategy.global_examples,
        "mp-round": server_round,
        "mp-quorum": list(quorum),
    }
    messages = [
        Message(
            content=RecordDict(
                {
                    "config": ConfigRecord({"server-round": server_round}),
                    "decrypt": ConfigRecord(record),
                }
            ),
            dst_node_id=nodes[name],
            message_type=MessageType.EVALUATE,
        )
        for name in quorum
    ]
    got: dict[str, rounds.SignedPartial] = {}
    votes: Counter[int] = Counter()
    for reply in exchange(grid, messages, timeout=timeout):
        signed = _partial(reply)
        if signed is not None and signed.partial.name in quorum:
            got[signed.partial.name] = signed
        elif reply.has_error():
            log.warning("Round %d: a key holder refused: %s", server_round, reply.error.reason)
            votes.update(refused_positions(reply) or set())
    return got, votes


def save_global_record(run_dir: Path, strategy: FedTuneStrategy) -> None:
    """Keep the global's receipts, count and partials beside the checkpoint (atomically)."""
    write_global_record(
        run_dir,
        {
            **receipts_to_record(strategy.global_receipts),
            "num-examples": strategy.global_examples,
            **strategy.global_extra,
        },
    )
