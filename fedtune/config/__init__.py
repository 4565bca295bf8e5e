"""Typed run configuration, parsed once from a flat kebab-case mapping.

The Flower run config (``[tool.flwr.app.config]`` in ``pyproject.toml``), the
TOML files in ``simulations/`` and ``fedtune simulate --set key=value`` all use
the same flat kebab-case keys (Flower run-config values are scalars, so lists are
comma-separated strings). :func:`parse_run_config` turns such a mapping into a
:class:`RunConfig` of per-concern dataclasses, each of which validates its values
in ``__post_init__`` and names the culprit key and value when one is wrong (the
checks that need the task and codec registries run in :func:`fedtune.resolve.resolve`,
since this package imports nothing of fedtune but :mod:`fedtune.errors`);
:func:`parse_wiring` reads the per-run paths and switches (``run-dir``, ...) into
a :class:`Wiring`.

One module per concern: :mod:`~fedtune.config.model`, :mod:`~fedtune.config.data`,
:mod:`~fedtune.config.train`, :mod:`~fedtune.config.federation`,
:mod:`~fedtune.config.crypto`, :mod:`~fedtune.config.privacy`; :mod:`~fedtune.config.run`
joins them, :mod:`~fedtune.config.parse` reads flat mappings and TOML files,
:mod:`~fedtune.config.wiring` the wiring keys.

The defaults live in these dataclasses and only there; ``tests/test_config.py``
checks that the Flower App defaults in ``pyproject.toml`` agree with them.
"""

from __future__ import annotations

from fedtune.config.crypto import CryptoConfig
from fedtune.config.data import DataConfig, Partitioning
from fedtune.config.federation import FederationConfig, sample_size
from fedtune.config.model import LoraVariant, ModelConfig
from fedtune.config.parse import (
    check_given,
    coerce_value,
    collect_overrides,
    describe_keys,
    known_keys,
    load_toml,
    parse_assignment,
    parse_run_config,
)
from fedtune.config.privacy import AccountantName, DPLevel, PrivacyConfig
from fedtune.config.run import RunConfig, toml_value
from fedtune.config.train import Device, OptimizerName, Precision, TrainConfig
from fedtune.config.wiring import WIRING_KEYS, Wiring, parse_node_limits, parse_wiring
from fedtune.errors import ConfigError

#: The name :mod:`fedtune.deploy` imports :func:`~fedtune.config.run.toml_value` by.
_toml_value = toml_value

__all__ = [
    "WIRING_KEYS",
    "AccountantName",
    "ConfigError",
    "CryptoConfig",
    "DPLevel",
    "DataConfig",
    "Device",
    "Precision",
    "FederationConfig",
    "LoraVariant",
    "ModelConfig",
    "OptimizerName",
    "Partitioning",
    "PrivacyConfig",
    "RunConfig",
    "TrainConfig",
    "Wiring",
    "check_given",
    "coerce_value",
    "collect_overrides",
    "describe_keys",
    "known_keys",
    "load_toml",
    "parse_assignment",
    "parse_node_limits",
    "parse_run_config",
    "parse_wiring",
    "sample_size",
    "toml_value",
]
