"""One line of the privacy ledger: a validated record of one release.

A ledger (:mod:`fedtune.privacy.ledger`) is a file a process reads back, so every
field of a record is checked -- type, range, known name -- whether it was just built or
parsed from disk, and a line written before releases were nonce-keyed is read with the
legacy defaults below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedtune.privacy._checks import (
    check_delta,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_sample_rate,
)
from fedtune.privacy.accountant import ACCOUNTANTS, MECHANISM_ACCOUNTANTS, MECHANISMS
from fedtune.privacy.analysis import RELATIONS

__all__ = [
    "KINDS",
    "LEVELS",
    "NOISE_SOURCES",
    "LedgerRecord",
]

KINDS: tuple[str, ...] = ("train", "eval", "eval-exact")
"""What a record releases. ``"train"``: a round's DP update. ``"eval"``: held-out
metrics as a Gaussian release (:mod:`fedtune.privacy.evaluation`; ``noise_multiplier``
is σ, ``max_grad_norm`` its L2 sensitivity in the release's own units, ``q = 1``, one
step; ``round`` is the evaluated state's round, 0 for the initial adapter).
``"eval-exact"``: exact held-out metrics a node sent by its own policy
(``evaluation = "exact"``): **not** accounted (no finite ε covers it), recorded so the
audit shows it; its ``noise_multiplier`` is 0."""

LEVELS: tuple[str, ...] = ("example", "client")
NOISE_SOURCES: tuple[str, ...] = ("csprng", "seeded")
"""Where a release's noise came from: a CSPRNG keyed from OS entropy, or a seeded key
(reproducible simulations only; :func:`fedtune.privacy.audit.audit_records` flags it)."""

#: Fields a ledger written before releases were nonce-keyed lacks, with the values a
#: reader fills in (the mechanism published n_k, so it is re-audited as replace-one;
#: its noise came from a seeded PRNG).
_LEGACY_DEFAULTS: dict[str, Any] = {
    "run_nonce": "",
    "input_hash": "",
    "relation": "replace-one",
    "noise": "seeded",
    "batch_size": 0,
    "local_epochs": 0,
    "num_examples": 0,
    "sampled_clients": 0,
    "tolerance": 0,
}

#: A record written before evaluation releases were recorded has no ``kind``: a round.
_KIND_DEFAULT: dict[str, Any] = {"kind": "train"}
#: A record written before grid DP-SGD has no ``mechanism``: float Gaussian noise.
_MECHANISM_DEFAULT: dict[str, Any] = {"mechanism": "gaussian"}


@dataclass(frozen=True)
class LedgerRecord:
    """One release of one client.

    ``noise_multiplier``, ``sample_rate`` and ``steps`` describe the release's
    composition, read from the Opacus objects that ran (example level) or the
    DP-FedAvg step (client level: ``sample_rate = 1``, one step; the server picks
    the clients, so there is no amplification against it). ``epsilon`` is the
    cumulative ε at ``delta`` under ``relation`` after it (see the module docstring).
    ``batch_size``, ``local_epochs`` and ``num_examples`` (example level) and
    ``sampled_clients`` / ``tolerance`` (client level: the noise shares were sized so
    that ``sampled_clients - tolerance`` of them carry the full σ) let an auditor
    cross-check the composition against the run's configuration. ``0`` means "not
    recorded" (legacy records). ``mechanism`` is the noise that ran
    (:data:`~fedtune.privacy.accountant.MECHANISMS`: ``"discrete-gaussian"`` for grid
    DP-SGD and client-level shares, ``"gaussian"`` for float DP-SGD and DP
    evaluations) and ``accountant`` the one whose ε is proven for every release
    composed into ``epsilon`` (``"discrete-rdp"`` once any of them is discrete).
    """

    run_id: str
    round: int
    client: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float
    level: str
    timestamp: float
    run_nonce: str = ""
    input_hash: str = ""
    relation: str = "replace-one"
    noise: str = "csprng"
    batch_size: int = 0
    local_epochs: int = 0
    num_examples: int = 0
    sampled_clients: int = 0
    tolerance: int = 0
    kind: str = "train"
    mechanism: str = "gaussian"

    def __post_init__(self) -> None:
        for name in ("run_id", "client"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
        for name in ("run_nonce", "input_hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 128 or not value.isprintable():
                raise ValueError(f"`{name}` must be a short printable string, got {value!r}.")
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}.")
        if self.kind == "train":
            check_positive_int("round", self.round)
        elif isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(
                f"`round` of an evaluation must be an integer >= 0, got {self.round!r}."
            )
        if self.kind == "eval-exact":
            if self.noise_multiplier != 0:
                raise ValueError(
                    "`noise_multiplier` of an exact evaluation (kind 'eval-exact') must be 0, "
                    f"got {self.noise_multiplier!r}."
                )
        else:
            check_positive("noise_multiplier", self.noise_multiplier)
        if self.kind != "train" and (self.sample_rate != 1.0 or self.steps != 1):
            raise ValueError(
                f"an evaluation record (kind {self.kind!r}) is one release at q = 1, got "
                f"sample_rate={self.sample_rate!r}, steps={self.steps!r}."
            )
        check_sample_rate("sample_rate", self.sample_rate)
        check_positive_int("steps", self.steps)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_delta("delta", self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"`mechanism` must be one of {MECHANISMS}, got {self.mechanism!r}.")
        if self.accountant not in MECHANISM_ACCOUNTANTS[self.mechanism]:
            raise ValueError(
                f"`accountant` {self.accountant!r} is not proven for mechanism "
                f"{self.mechanism!r}; use one of {MECHANISM_ACCOUNTANTS[self.mechanism]}."
            )
        if not (isinstance(self.epsilon, (int, float)) and not isinstance(self.epsilon, bool)):
            raise ValueError(f"`epsilon` must be a number, got {self.epsilon!r}.")
        if math.isnan(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"`epsilon` must be >= 0 (inf allowed), got {self.epsilon!r}.")
        if self.level not in LEVELS:
            raise ValueError(f"`level` must be one of {LEVELS}, got {self.level!r}.")
        if self.relation not in RELATIONS:
            raise ValueError(f"`relation` must be one of {RELATIONS}, got {self.relation!r}.")
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"`noise` must be one of {NOISE_SOURCES}, got {self.noise!r}.")
        for name in ("batch_size", "local_epochs", "num_examples", "sampled_clients", "tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        check_non_negative("timestamp", self.timestamp)

    @property
    def key(self) -> tuple[str, int, str]:
        """The release key ``(run_nonce, round, client)``; legacy records use ``run_id``.

        An evaluation release has a key of its own (``run_nonce`` + ``"/eval"``): round
        ``t``'s update and the evaluation of round ``t``'s state are two releases.
        """
        nonce = self.run_nonce or f"legacy:{self.run_id}"
        return (nonce if self.kind == "train" else f"{nonce}/eval", self.round, self.client)

    @property
    def accounted(self) -> bool:
        """False for an exact evaluation: sent outside the guarantee, in no ε."""
        return self.kind != "eval-exact"

    @property
    def legacy(self) -> bool:
        """True for a record written before releases were nonce-keyed."""
        return not self.run_nonce

    def same_round(self, other: LedgerRecord) -> bool:
        """True when ``other`` records the same release (same input, same parameters)."""
        skip = {"epsilon", "timestamp"}
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in fields(self)
            if f.name not in skip
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (``inf`` ε is written as the string "inf")."""
        out = asdict(self)
        if math.isinf(self.epsilon):
            out["epsilon"] = "inf"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerRecord:
        """Inverse of :meth:`to_dict`; validates every field."""
        names = {f.name for f in fields(cls)}
        if isinstance(data, Mapping) and "kind" not in data:
            data = {**_KIND_DEFAULT, **data}
        if isinstance(data, Mapping) and "mechanism" not in data:
            data = {**_MECHANISM_DEFAULT, **data}
        if isinstance(data, Mapping) and set(data) == names - set(_LEGACY_DEFAULTS):
            data = {**_LEGACY_DEFAULTS, **data}
        if not isinstance(data, Mapping) or set(data) != names:
            got = sorted(data) if isinstance(data, Mapping) else data
            raise ValueError(
                f"a ledger record must have exactly the keys {sorted(names)}, got {got!r}."
            )
        values = dict(data)
        if values["epsilon"] == "inf":
            values["epsilon"] = math.inf
        return cls(**values)
