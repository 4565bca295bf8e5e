"""The fully resolved configuration of one run: one typed config per concern.

:class:`RunConfig` holds the per-concern dataclasses and checks what only holds
across them (``min-clients <= num-clients``, client-level DP needs encryption, ...).
What needs the task or codec registries is checked by :func:`fedtune.resolve.resolve`,
above this package. It renders back to the flat kebab-case mapping
:func:`fedtune.config.parse_run_config` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from fedtune.config._checks import require
from fedtune.config.crypto import CryptoConfig
from fedtune.config.data import DataConfig
from fedtune.config.federation import FederationConfig
from fedtune.config.model import ModelConfig
from fedtune.config.privacy import PrivacyConfig
from fedtune.config.train import TrainConfig
from fedtune.errors import ConfigError

__all__ = ["SECTION_TYPES", "RunConfig", "kebab", "toml_value"]


@dataclass(frozen=True)
class RunConfig:
    """The fully resolved configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        fed, p = self.federation, self.privacy
        require(
            fed.min_clients <= fed.num_clients,
            "min-clients",
            fed.min_clients,
            f"must be <= num-clients ({fed.num_clients})",
        )
        if p.dp == "client" and not self.crypto.encryption:
            raise ConfigError(
                "`dp` = 'client' needs `encryption` = true, got `encryption` = false: "
                "without it the server sees every update with only its own noise share."
            )
        if p.dp == "client":
            m = fed.sampled_per_round
            require(
                p.client_dp_tolerance < m,
                "client-dp-tolerance",
                p.client_dp_tolerance,
                f"must be < the {m} clients sampled per round (`fraction-train` x `num-clients`)",
            )

    def to_flat(self) -> dict[str, Any]:
        """Return the flat kebab-case mapping that :func:`parse_run_config` reads."""
        flat: dict[str, Any] = {}
        for section in SECTION_TYPES:
            part = getattr(self, section)
            for f in fields(part):
                flat[kebab(f.name)] = getattr(part, f.name)
        return flat

    def to_toml(self) -> str:
        """Render the flat mapping as TOML (scalars only)."""
        return "".join(f"{k} = {toml_value(v)}\n" for k, v in self.to_flat().items())


#: Each section of :class:`RunConfig` and its dataclass, in ``to_flat`` order.
SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "crypto": CryptoConfig,
    "privacy": PrivacyConfig,
}


def kebab(name: str) -> str:
    """A dataclass field name as its config key (``num_rounds`` -> ``num-rounds``)."""
    return name.replace("_", "-")


def toml_value(value: object) -> str:
    """``value`` as a TOML scalar (a bool, a number, or a quoted string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
