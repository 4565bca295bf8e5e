"""Resolve a flat run config once into a checked :class:`RunContext`: config, wiring, task, codec.

:func:`fedtune.config.parse_run_config` checks every value that the configuration alone
can judge; :mod:`fedtune.config` imports nothing of fedtune but :mod:`fedtune.errors`, so
it is the bottom layer. What needs the registries above it is checked here, in one place:

- ``task`` names a registered task (:mod:`fedtune.tasks`);
- ``encryption-backend`` names a registered codec backend other than ``plain``
  (:mod:`fedtune.secure`);
- with DP on, a task that uses labels and reads its own data needs ``label-names`` (a label
  set read from the data would set the payload length the server sees).

Each party (the simulation driver, the server, a client node, the CLI commands that read
a run's ``config.toml``) resolves its flat mapping here instead of calling
``parse_run_config`` directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedtune.config import WIRING_KEYS, RunConfig, Wiring, parse_run_config, parse_wiring
from fedtune.config._checks import choice, require
from fedtune.secure import backend_names
from fedtune.tasks import get_task, task_names
from fedtune.tasks.base import Task

__all__ = ["RunContext", "check_registered", "resolve"]


@dataclass(frozen=True)
class RunContext:
    """One run's checked configuration, as one party sees it.

    Attributes
    ----------
    config : RunConfig
        The typed configuration, every registry-dependent check passed.
    wiring : Wiring
        The per-run paths and switches (``run-dir``, ``state-dir``, ...); the defaults
        when the mapping was resolved without wiring keys.
    """

    config: RunConfig
    wiring: Wiring = field(default_factory=Wiring)

    @property
    def task(self) -> Task:
        """The registered task of ``task`` (built on first use: it may import torch)."""
        return get_task(self.config.model.task)

    @property
    def codec_name(self) -> str:
        """The codec backend every party uses: ``plain`` with encryption off."""
        return self.config.crypto.codec_name


def check_registered(cfg: RunConfig) -> RunConfig:
    """Check what needs the task and codec registries; return ``cfg`` unchanged.

    Raises
    ------
    ConfigError
        Naming the key and value: an unknown ``task`` or ``encryption-backend`` (with
        every registered name), or ``label-names`` missing under DP.
    """
    choice("task", cfg.model.task, task_names())
    backends = tuple(n for n in backend_names() if n != "plain")
    choice("encryption-backend", cfg.crypto.encryption_backend, backends)
    if cfg.privacy.enabled and get_task(cfg.model.task).uses_labels and cfg.data.data_path:
        require(
            bool(cfg.data.labels),
            "label-names",
            cfg.data.label_names,
            "must list the labels when DP is on (a label set read from the data would "
            "set the payload length the server sees)",
        )
    return cfg


def resolve(
    values: Mapping[str, object], *, wiring: bool = True, given: bool = False
) -> RunContext:
    """Parse and check a flat kebab-case run config once.

    Parameters
    ----------
    values : Mapping[str, object]
        Keys as in ``pyproject.toml``; missing keys take their defaults.
    wiring : bool
        Whether ``values`` may hold the wiring keys (:data:`fedtune.config.WIRING_KEYS`,
        read into :attr:`RunContext.wiring`); without, such a key is an unknown key
        (a run's ``config.toml``, ``fedtune simulate``'s overrides).
    given : bool
        Whether ``values`` holds only the keys a person set (``fedtune simulate``'s
        config file and ``--set``), not a resolved config; see
        :func:`fedtune.config.parse_run_config`.

    Raises
    ------
    ConfigError
        For an unknown key or a bad value (see :func:`check_registered`).
    """
    if not wiring:
        return RunContext(check_registered(parse_run_config(values, given=given)))
    cfg = check_registered(parse_run_config(values, ignore=WIRING_KEYS, given=given))
    return RunContext(cfg, parse_wiring(values))
