"""A key holder's side of verified aggregation, on a :class:`ClientRuntime`.

Two calls from :mod:`fedtune.node.round`: :func:`check_runtime_global` before a
global sum is used (kept, evaluated or trained from), :func:`sign_outcome` on an
upload before it leaves. The checks themselves live in :mod:`fedtune.secure.verify`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from fedtune.secure.verify import UsedGlobals, check_global, min_uploads, sign_upload
from fedtune.train.runtime import ClientRuntime
from fedtune.train.state import GlobalState, TrainOutcome

__all__ = ["check_runtime_global", "sign_outcome", "used_globals"]

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
    payload = sign_upload(
        runtime.codec,
        outcome.payload,
        run=runtime.run_id,
        server_round=server_round,
        name=runtime.name,
        num_examples=outcome.num_examples,
    )
    return replace(outcome, payload=payload)
