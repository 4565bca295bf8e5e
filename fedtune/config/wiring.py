"""The wiring of a run: paths and switches set per run or per process, not by the config.

Beside the :class:`~fedtune.config.RunConfig` keys, the Flower run config (and a
node's ``--node-config``) carries keys that say *where* things are for this run or
this process: the server's ``run-dir``, a node's ``state-dir`` and CKKS contexts,
``resume``, the per-node example limits of a deployment. They are declared in
``pyproject.toml`` beside the config keys (empty by default) and parsed here, once,
into a :class:`Wiring`; both apps read them from it and never from the raw mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from fedtune.config.parse import coerce_value
from fedtune.config.run import kebab
from fedtune.errors import ConfigError
from fedtune.ids import is_decimal

__all__ = ["WIRING_KEYS", "Wiring", "parse_node_limits", "parse_wiring"]


@dataclass(frozen=True)
class Wiring:
    """Where a run's files are and how it starts; ``None`` / empty when not set.

    Attributes
    ----------
    run_dir : Path | None
        ``run-dir``: the server's run directory (checkpoint, ``metrics.jsonl``); in a
        simulation also where the clients keep their ledgers (``RUN_DIR/privacy``).
    run_id : str
        ``run-id``: the name the clients' privacy ledgers key this run by.
    state_dir : Path | None
        ``state-dir``: a node's own state directory (ledger, last global state).
    secret_context, public_context : Path | None
        ``secret-context`` (a key holder's CKKS context) and ``public-context`` (the
        server's, without a secret key).
    resume : bool
        ``resume``: continue from the checkpoint in ``run-dir``.
    node_limits : Mapping[int, int]
        ``node-limits`` (``"ID=N,ID=N"``): node id -> the largest example count that
        node may claim, set when the operator registered it.
    """

    run_dir: Path | None = field(
        default=None,
        metadata={
            "help": "The server's run directory; empty: `runs/flwr-<Flower run id>` "
            "(`fedtune simulate` and `fedtune deploy run` set it from `--run-dir`).",
            "toml": '""',
        },
    )
    run_id: str = field(
        default="",
        metadata={
            "help": "The name the clients' ledgers key this run by; empty: the run "
            "directory's name."
        },
    )
    state_dir: Path | None = field(
        default=None,
        metadata={
            "help": "A node's own state directory (ledger, last global state).",
            "toml": '""',
        },
    )
    secret_context: Path | None = field(
        default=None,
        metadata={"help": "A key holder's CKKS secret context (`fedtune keygen`).", "toml": '""'},
    )
    public_context: Path | None = field(
        default=None,
        metadata={"help": "The server's CKKS public context (no secret key).", "toml": '""'},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the checkpoint in `run-dir`."},
    )
    node_limits: Mapping[int, int] = field(
        default_factory=dict,
        metadata={
            "help": '`"ID=N,ID=N"`: node id -> the largest example count that node may '
            "claim, set by `fedtune deploy run` from the operator's registrations.",
            "toml": '""',
        },
    )

    def run_dir_for(self, flower_run_id: int | str) -> Path:
        """``run-dir``, else ``runs/flwr-<run id>``: a new directory for each Flower run.

        ``flwr run`` gives every run its own id; the server and, in a simulation,
        the clients (their ledgers are in ``RUN_DIR/privacy``) derive the same path
        from it, relative to the simulation's working directory.
        """
        return self.run_dir or Path("runs") / f"flwr-{flower_run_id}"

    def run_name(self, flower_run_id: int | str) -> str:
        """``run-id``, else the run directory's name (the key of the clients' ledgers)."""
        return self.run_id or self.run_dir_for(flower_run_id).name


#: Run-config keys that belong to the wiring (paths set per run or per process),
#: not to :class:`~fedtune.config.RunConfig`; both apps accept and skip them.
WIRING_KEYS = frozenset(kebab(f.name) for f in fields(Wiring))

_PATH_KEYS = ("run-dir", "state-dir", "secret-context", "public-context")


def _path(key: str, value: object) -> Path | None:
    if value is None or value == "":
        return None
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ConfigError(f"`{key}` must be a path (a string), got {value!r}.")


def _run_id(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"`run-id` must be a string, got {value!r}.")


def parse_node_limits(value: object) -> dict[int, int]:
    """The ``node-limits`` wiring key (``"ID=N,ID=N"``, from ``fedtune deploy run``).

    Raises
    ------
    ConfigError
        Naming the entry that is not ``node id = count >= 1``.
    """
    text = str(value or "").strip()
    limits: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        node, sep, limit = item.partition("=")
        node, limit = node.strip(), limit.strip()
        if not (sep and is_decimal(node) and is_decimal(limit) and int(limit) >= 1):
            raise ConfigError(
                f"`node-limits` entry {item!r} is not NODE_ID=COUNT with COUNT >= 1 "
                f"(in {text[:200]!r})."
            )
        limits[int(node)] = int(limit)
    return limits


def parse_wiring(flat: Mapping[str, object]) -> Wiring:
    """Read the wiring keys of a flat run config (other keys are left to the RunConfig).

    Raises
    ------
    ConfigError
        Naming the key and its value: a path that is not a string, a ``resume`` that
        is not a boolean, a malformed ``node-limits`` entry.
    """
    paths = {key: _path(key, flat.get(key)) for key in _PATH_KEYS}
    return Wiring(
        run_dir=paths["run-dir"],
        run_id=_run_id(flat.get("run-id")),
        state_dir=paths["state-dir"],
        secret_context=paths["secret-context"],
        public_context=paths["public-context"],
        resume=bool(coerce_value("resume", flat.get("resume", False), False)),
        node_limits=parse_node_limits(flat.get("node-limits", "")),
    )
