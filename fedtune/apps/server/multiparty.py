"""The server's decryption step of ``ckks-multiparty`` (docs/multiparty.md).

After a round's uploads are summed, :func:`decryption_step`

1. sends a ``ready`` probe to every key holder that uploaded in the round (a fixed reply,
   nothing computed from a secret) and takes the first ``t`` that answer, in name order
   among those, as the round's quorum: a holder gone between upload and decryption is
   simply not chosen; with fewer than ``t`` live the run stops with one line naming who
   is missing;
2. saves the decryption request (receipts, count, round, quorum) and the encrypted sum in
   ``RUN_DIR/multiparty-pending.json`` *before* the first ``decrypt`` message leaves;
3. sends that one request to the quorum, and sends the *same* request again to a member
   that did not answer, until ``round-timeout``; never another quorum once a holder may
   have answered (two answers of one holder for two quorums give away its smudging
   noise, docs/multiparty.md "Dropouts"). A run stopped here is resumed by
   :func:`resume_decryption`, which asks exactly the saved request again;
4. checks each signed partial decryption against the roster, and attaches the quorum and
   the partials to the global record every later message carries
   (:attr:`FedTuneStrategy.global_extra`): the clients combine and check them themselves.

The server combines too (export) and so sees the round's sum, as with secure aggregation.
It keeps the partials and the receipts of the checkpointed round in
``RUN_DIR/multiparty-global.json`` so that ``fedtune export`` opens the checkpoint without
any key and without a second decryption, and a resumed run sends the same global again
(:func:`resume_global`).

A sum with an upload whose signature fails is refused by honest holders before they compute
anything, naming its position: the upload is dropped (as in
:mod:`fedtune.apps.server.verified`) and the quorum asked again with the smaller sum.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.apps.server.quorum import Answers, ask, probe
from fedtune.apps.server.replies import stated_name
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.apps.server.verified import UNAUTHENTIC, drop_uploads
from fedtune.errors import FederationError
from fedtune.run.checkpoint import Checkpoint
from fedtune.secure.codec import WirePayload
from fedtune.secure.multiparty import rounds
from fedtune.secure.multiparty.backend import MultipartyServerCodec
from fedtune.secure.multiparty.global_file import (
    GLOBAL_FILE,
    PENDING_DECRYPTION,
    load_global_record,
    load_pending_decryption,
    write_global_record,
    write_pending_decryption,
)
from fedtune.secure.multiparty.protocol import (
    SIGNATURE_BYTES,
    DecryptionRequest,
    PartialDecryption,
    Roster,
)
from fedtune.secure.verify import receipts_from_record, receipts_to_record

__all__ = [
    "GLOBAL_FILE",
    "PENDING_DECRYPTION",
    "decryption_step",
    "load_global_record",
    "pending_round",
    "resume_decryption",
    "resume_global",
]

log = logging.getLogger("fedtune.server")

_PAYLOAD_KEYS = ("chunks", "length", "fingerprint")


def _codec(strategy: FedTuneStrategy) -> MultipartyServerCodec:
    codec = strategy.codec
    if not isinstance(codec, MultipartyServerCodec):
        raise TypeError("the multiparty decryption step needs the multiparty server codec.")
    return codec


def _save_request(run_dir: Path, request: DecryptionRequest, payload: WirePayload) -> None:
    """Keep ``request`` and its sum before any ``decrypt`` message of it leaves."""
    write_pending_decryption(
        run_dir,
        {
            **receipts_to_record(request.receipts),
            "num-examples": request.num_examples,
            "mp-round": request.server_round,
            "mp-quorum": list(request.quorum),
            **{f"sum-{k}": payload[k] for k in _PAYLOAD_KEYS},
        },
    )


def _stop(request: DecryptionRequest, answers: Answers, timeout: float) -> FederationError:
    missing = sorted(set(request.quorum) - set(answers.got))
    why = "; ".join(f"{n}: {answers.refused.get(n, 'no reply')}" for n in missing)
    return FederationError(
        f"Round {request.server_round}: key holder(s) {missing} of the quorum "
        f"{list(request.quorum)} gave no valid signed partial decryption within `round-timeout` "
        f"= {timeout:g} s ({why}). Stopping; the previous checkpoint is kept and "
        f"{PENDING_DECRYPTION} holds the request: resuming the run asks exactly it again."
    )


def decryption_step(
    grid: Grid,
    strategy: FedTuneStrategy,
    train_replies: Sequence[Message],
    *,
    server_round: int,
    timeout: float,
    run_dir: Path,
) -> None:
    """Pick a live quorum, ask it for round ``server_round``'s partials; attach them.

    Raises
    ------
    FederationError
        If fewer than ``t`` uploaders answer the ``ready`` probe (naming who is
        missing), or a quorum member gives no valid signed partial within
        ``timeout`` (the request stays in :data:`PENDING_DECRYPTION` for a resume).
    """
    roster: Roster = _codec(strategy).roster
    deadline = time.monotonic() + timeout
    nodes: dict[str, int] = {}
    for msg in train_replies:
        name = stated_name(msg)
        if name is not None and not msg.has_error():
            nodes.setdefault(name, msg.metadata.src_node_id)
    uploaders = sorted(r.name for r in strategy.global_receipts if r.name in nodes)
    live = probe(
        grid,
        [nodes[n] for n in uploaders],
        server_round=server_round,
        timeout=timeout,
        enough=lambda found: len(found) >= roster.threshold,
    )
    live = {n: node for n, node in live.items() if nodes.get(n) == node}
    # Each pass either ends the step or drops at least one upload the quorum named.
    for _ in range(len(strategy.global_receipts) + 1):
        quorum = sorted(r.name for r in strategy.global_receipts if r.name in live)
        quorum = quorum[: roster.threshold]
        if len(quorum) < roster.threshold:
            gone = sorted(set(uploaders) - set(live))
            raise FederationError(
                f'Round {server_round}: `encryption-backend` = "ckks-multiparty" needs '
                f"{roster.threshold} key holders to decrypt the sum; {len(quorum)} of the "
                f"round's uploaders answered the ready probe (missing: {gone}). Stopping; "
                "the previous checkpoint is kept. Run with more clients per round."
            )
        request = DecryptionRequest(
            server_round, tuple(strategy.global_receipts), strategy.global_examples, tuple(quorum)
        )
        assert strategy.global_payload is not None  # summed before the decryption step
        _save_request(run_dir, request, strategy.global_payload)
        answers = ask(grid, request, live, deadline=deadline)
        if len(answers.got) == len(quorum):
            break
        # Honest holders refuse, before computing anything, a sum with an upload whose
        # signature fails, naming its position: drop what a strict majority of the
        # quorum named and ask again (they answered nothing for this round yet).
        n_receipts = len(strategy.global_receipts)
        votes = answers.votes
        agreed = {i for i, v in votes.items() if 2 * v > len(quorum) and i < n_receipts}
        if not drop_uploads(strategy, agreed, server_round, UNAUTHENTIC):
            raise _stop(request, answers, timeout)
    _finish(run_dir, strategy, roster, request, answers)


def _finish(
    run_dir: Path,
    strategy: FedTuneStrategy,
    roster: Roster,
    request: DecryptionRequest,
    answers: Answers,
) -> None:
    """Check each signed partial against the roster; attach them; keep them on disk."""
    digest = request.digest(roster)
    partials = []
    for name in request.quorum:
        p = answers.got[name].partial
        signed = rounds.SignedPartial(
            PartialDecryption(name, digest, p.chunks), answers.got[name].signature
        )
        if not rounds.verify_partial(roster, signed):
            raise FederationError(
                f"Round {request.server_round}: the partial decryption of key holder {name!r} "
                "is not signed by its roster key for this round's request. Stopping; the "
                "previous checkpoint is kept."
            )
        partials.append(signed)
    strategy.global_extra = rounds.partials_to_record(request, partials)
    save_global_record(run_dir, strategy)


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


# -- resume -----------------------------------------------------------------------------


def pending_round(run_dir: Path) -> int | None:
    """The round of the request in :data:`PENDING_DECRYPTION`, if there is one."""
    doc = load_pending_decryption(run_dir)
    if doc is None:
        return None
    rnd = doc.get("mp-round")
    if type(rnd) is not int:
        raise FederationError(
            f"{str(run_dir / PENDING_DECRYPTION)!r} names no round; restore the file the "
            "server wrote."
        )
    return rnd


def resume_global(run_dir: Path, strategy: FedTuneStrategy, checkpoint: Checkpoint) -> None:
    """Continue from ``checkpoint`` with its round's receipts and partials (GLOBAL_FILE).

    :meth:`FedTuneStrategy.resume` checks the sum's ``c1`` against the receipts; the
    partials' signatures are checked here against the roster; the clients check
    everything again before they use the global.
    """
    roster = _codec(strategy).roster
    checkpoint_round = checkpoint.round
    record = load_global_record(run_dir)
    where = f"{str(run_dir / GLOBAL_FILE)!r}"
    if record.get("mp-round") != checkpoint_round:
        raise FederationError(
            f"{where} holds round {record.get('mp-round')!r}, the checkpoint round "
            f"{checkpoint_round}; restore the files the server wrote together."
        )
    try:
        receipts = receipts_from_record(record, tag_bytes=SIGNATURE_BYTES)
        num_examples = record.get("num-examples")
        if num_examples != checkpoint.num_examples or type(num_examples) is not int:
            raise ValueError(
                f"`num-examples` {num_examples!r}, {checkpoint.num_examples} checkpointed"
            )
        _, partials = rounds.partials_from_record(
            roster, record, receipts=receipts, num_examples=num_examples
        )
    except Exception as err:  # noqa: BLE001 - GlobalRefused or a malformed field
        raise FederationError(f"{where} does not parse ({err}); restore it.") from err
    if not all(rounds.verify_partial(roster, s) for s in partials):
        raise FederationError(
            f"{where}: a partial decryption is not signed by its roster key; restore the file."
        )
    strategy.resume(checkpoint.payload, num_examples, list(receipts))
    strategy.global_extra = {k: record[k] for k in rounds.RECORD_KEYS}


def resume_decryption(
    grid: Grid, strategy: FedTuneStrategy, *, run_dir: Path, server_round: int, timeout: float
) -> bool:
    """Ask :data:`PENDING_DECRYPTION`'s request of ``server_round`` again, if it is there.

    The request is sent exactly as saved (same receipts, same quorum): holders that
    answered it before the stop answer from their round logs with the same bytes. The
    quorum members are found by the ``ready`` probe (node ids change across restarts).
    Returns ``True`` when round ``server_round``'s global is decrypted and attached.
    """
    doc = load_pending_decryption(run_dir)
    if doc is None or doc.get("mp-round") != server_round:
        return False
    roster = _codec(strategy).roster
    try:
        receipts = receipts_from_record(doc, tag_bytes=SIGNATURE_BYTES)
        quorum, total = doc.get("mp-quorum"), doc.get("num-examples")
        if not isinstance(quorum, list) or not all(isinstance(q, str) for q in quorum):
            raise ValueError("no `mp-quorum`")
        if type(total) is not int:
            raise ValueError("no `num-examples`")
        payload = {k: doc[f"sum-{k}"] for k in _PAYLOAD_KEYS}
    except Exception as err:  # noqa: BLE001 - GlobalRefused, KeyError, ValueError
        raise FederationError(
            f"{str(run_dir / PENDING_DECRYPTION)!r} does not parse ({err}); restore it."
        ) from err
    strategy.resume(payload, total, list(receipts))  # the sum's c1 against the receipts
    request = DecryptionRequest(server_round, tuple(receipts), total, tuple(quorum))
    log.info("Round %d: asking the saved decryption request again", server_round)
    deadline = time.monotonic() + timeout
    found = probe(
        grid,
        list(grid.get_node_ids()),
        server_round=server_round,
        timeout=timeout,
        enough=lambda live: set(quorum) <= set(live),
    )
    nodes = {n: found[n] for n in quorum if n in found}
    answers = ask(grid, request, nodes, deadline=deadline)
    if len(answers.got) != len(quorum):
        raise _stop(request, answers, timeout)
    _finish(run_dir, strategy, roster, request, answers)
    return True
