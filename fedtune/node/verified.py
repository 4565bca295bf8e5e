"""A key holder's side of verified aggregation, on a :class:`ClientRuntime`.

Two calls from :mod:`fedtune.node.round`: :func:`check_runtime_global` before a
global sum is used (kept, evaluated or trained from), :func:`sign_outcome` on an
upload before it leaves. The checks themselves live in :mod:`fedtune.secure.verify`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedtune import bounds
from fedtune.errors import GlobalRefused
from fedtune.messages import check_reply
from fedtune.secure.blame import BLAME, BLAME_REFUSED, blame_positions
from fedtune.secure.multiparty import node as multiparty_node
from fedtune.secure.multiparty.backend import MultipartyCodec
from fedtune.secure.verify import (
    MALFORMED,
    UsedGlobals,
    check_global,
    min_uploads,
    receipts_from_record,
    sign_upload,
)
from fedtune.train.runtime import ClientRuntime
from fedtune.train.state import GlobalState, TrainOutcome

__all__ = [
    "blame_reply",
    "check_runtime_global",
    "partial_reply",
    "ready_reply",
    "round_log_dir",
    "sign_outcome",
    "used_globals",
]

#: File (in ``STATE_DIR``, else ``PRIVACY_DIR/<name>.``) of the globals a node used.
USED_GLOBALS = "globals-used.json"
_MEMORY: dict[int, UsedGlobals] = {}


def used_globals(runtime: ClientRuntime) -> UsedGlobals:
    """This node's :class:`UsedGlobals`, in its state or privacy directory."""
    path: Path | None
    if runtime.state_dir is not None:
        path = runtime.state_dir / USED_GLOBALS
    elif runtime.privacy_dir is not None:
        path = runtime.privacy_dir / f"{runtime.name}.{USED_GLOBALS}"
    else:
        return _MEMORY.setdefault(id(runtime), UsedGlobals(None))
    return UsedGlobals(path)


def check_runtime_global(
    runtime: ClientRuntime,
    record: Mapping[str, object],
    state: GlobalState,
    *,
    server_round: int,
) -> None:
    """Refuse (:class:`fedtune.secure.verify.GlobalRefused`) a global this node may not use."""
    if isinstance(runtime.codec, MultipartyCodec):  # ckks-multiparty: open it here, or refuse
        multiparty_node.open_record(
            runtime.codec,
            record,
            state.payload,
            state.num_examples,
            run=runtime.run_id,
            server_round=server_round,
            min_count=_min_count(runtime),
            used=used_globals(runtime),
        )
        return
    check_global(
        runtime.codec,
        record,
        state.payload,
        state.num_examples,
        run=runtime.run_id,
        server_round=server_round,
        min_count=min_uploads(
            min_clients=runtime.cfg.federation.min_clients, dp=runtime.cfg.privacy.dp
        ),
        used=used_globals(runtime),
    )


def sign_outcome(
    runtime: ClientRuntime, outcome: TrainOutcome, *, server_round: int
) -> TrainOutcome:
    """``outcome`` with its upload tagged (unchanged when declined or without a key)."""
    if outcome.payload is None:
        return outcome
    if isinstance(runtime.codec, MultipartyCodec):  # the party's Ed25519 signature
        signed = multiparty_node.sign(
            runtime.codec,
            outcome.payload,
            server_round=server_round,
            num_examples=outcome.num_examples,
        )
        return replace(outcome, payload=signed)
    payload = sign_upload(
        runtime.codec,
        outcome.payload,
        run=runtime.run_id,
        server_round=server_round,
        name=runtime.name,
        num_examples=outcome.num_examples,
    )
    return replace(outcome, payload=payload)


def _min_count(runtime: ClientRuntime) -> int:
    return min_uploads(min_clients=runtime.cfg.federation.min_clients, dp=runtime.cfg.privacy.dp)


#: Directory (in ``STATE_DIR``, else ``PRIVACY_DIR/<name>.``) of a key holder's round log.
ROUND_LOG = "multiparty-rounds"


def round_log_dir(runtime: ClientRuntime) -> Path | None:
    """Where this key holder keeps its one answer per round (beside its used globals)."""
    if runtime.state_dir is not None:
        return runtime.state_dir / ROUND_LOG
    if runtime.privacy_dir is not None:
        return runtime.privacy_dir / f"{runtime.name}.{ROUND_LOG}"
    return None


def partial_reply(runtime: ClientRuntime, content: RecordDict) -> RecordDict:
    """Answer a ``decrypt`` message (``ckks-multiparty`` only; a refusal code otherwise)."""
    if not isinstance(runtime.codec, MultipartyCodec):
        raise GlobalRefused(MALFORMED)
    return multiparty_node.partial_reply(
        runtime.codec, content, min_count=_min_count(runtime), rounds_dir=round_log_dir(runtime)
    )


def ready_reply(runtime: ClientRuntime) -> RecordDict:
    """Answer the server's ``ready`` probe (``ckks-multiparty`` only)."""
    if not isinstance(runtime.codec, MultipartyCodec):
        raise GlobalRefused(MALFORMED)
    return multiparty_node.ready_reply(runtime.codec)


def _within(prescaled: np.ndarray, num_examples: int) -> bool:
    """The node's value check of one upload ``n_k w_k``: finite, ``|w| <= VALUE_BOUND``."""
    return bool(bounds.within_bound(np.asarray(prescaled) / num_examples, bounds.VALUE_BOUND))


def blame_reply(runtime: ClientRuntime, content: RecordDict) -> RecordDict:
    """Answer a blame request (:mod:`fedtune.secure.blame`): which uploads fail the checks.

    Only under ``dp = "example"`` (else :data:`BLAME_REFUSED`), and one request per
    round (the same one again is answered again; another is refused like a second
    global, :data:`fedtune.secure.verify.REPLACED`).
    """
    try:
        config = content.config_records["config"]
        record = content.config_records["blame"]
        server_round = config["blame-round"]
    except KeyError:
        raise GlobalRefused(MALFORMED) from None
    if type(server_round) is not int:
        raise GlobalRefused(MALFORMED)
    if runtime.cfg.privacy.dp != "example":
        answer = BLAME_REFUSED
    else:
        chunks = record.get("uploads-chunks")
        digest = hashlib.sha256()
        for chunk in chunks if isinstance(chunks, list) else []:
            digest.update(chunk if isinstance(chunk, bytes) else b"")
        used_globals(runtime).claim(f"{runtime.run_id}/{server_round}/blame", digest.hexdigest())
        positions = blame_positions(
            runtime.codec,
            record,
            run=runtime.run_id,
            server_round=server_round,
            within_bounds=_within,
        )
        listed = receipts_from_record(record)
        used_globals(runtime).note_blamed(
            f"{runtime.run_id}/{server_round}", [listed[i].tag.hex() for i in positions]
        )
        answer = BLAME + ",".join(map(str, positions))
    content_out = {"info": {"client": runtime.name, "blame": answer}}
    check_reply(content_out, phase="evaluate", private=runtime.cfg.privacy.enabled)
    return RecordDict({"info": ConfigRecord(content_out["info"])})  # type: ignore[arg-type]
