"""``fedtune simulate --resume RUN_DIR``: the run's own configuration and its last round.

A resumed simulation is a deployed resume (:func:`fedtune.apps.server.app.resume_round`:
the signed checkpoint, ``metrics.jsonl`` cut back to the rounds before it, the
checkpoint round's train half from the pending file) with the run's own
``config.toml``. The clients' ledgers stay in ``RUN_DIR/privacy``; a message a client
already answered before the stop is sent again with the same input and its release is
replayed from the ledger, not counted again.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedtune.config import RunConfig, load_toml
from fedtune.errors import ConfigError
from fedtune.resolve import resolve
from fedtune.run.checkpoint import CheckpointError, load_checkpoint

__all__ = ["checkpoint_round", "prepare_resume"]


def prepare_resume(flat: Mapping[str, object], run_dir: Path) -> RunConfig:
    """The config of the run in ``run_dir``, with ``num-rounds`` from ``flat`` if given.

    Only ``num-rounds`` may change on a resume (to extend a finished run); any other
    key of ``flat`` that differs from ``RUN_DIR/config.toml`` would make a different
    run and is refused, naming the key.
    """
    if not run_dir.is_dir() or not (run_dir / "config.toml").is_file():
        raise ConfigError(
            f"--resume {str(run_dir)!r} is not a run directory (no config.toml in it); "
            "give the directory an earlier `fedtune simulate` wrote."
        )
    saved = resolve(load_toml(run_dir / "config.toml"), wiring=False).config
    wanted = resolve({**saved.to_flat(), **dict(flat)}, wiring=False).config
    before, after = saved.to_flat(), wanted.to_flat()
    changed = sorted(k for k in after if k != "num-rounds" and after[k] != before.get(k))
    if changed:
        key = changed[0]
        raise ConfigError(
            f"--resume: `{key}` = {after[key]!r} differs from the run's {before.get(key)!r} "
            f"(in {str(run_dir / 'config.toml')!r}); a resumed run keeps its configuration "
            "(only `num-rounds` may grow). Drop the --set, or start a new run."
        )
    if saved.privacy.enabled and after["num-rounds"] != before["num-rounds"]:
        raise ConfigError(
            f"--resume: `num-rounds` = {after['num-rounds']} differs from the run's "
            f"{before['num-rounds']}; a DP run's clients key their releases by the run's "
            "configuration, so a longer run would count its last evaluation again. Resume "
            "without --set, and start a new run for more rounds."
        )
    return wanted


def checkpoint_round(run_dir: Path) -> int | None:
    """The round of ``RUN_DIR/checkpoint`` (verified), or ``None`` when there is none."""

    if not (run_dir / "checkpoint").exists():
        return None
    try:
        return load_checkpoint(run_dir / "checkpoint", key_dir=run_dir).round
    except CheckpointError as err:
        raise ConfigError(
            f"--resume {str(run_dir)!r}: the checkpoint does not verify ({err}); restore "
            "it (checkpoint.previous holds the round before) or start a new run."
        ) from err
