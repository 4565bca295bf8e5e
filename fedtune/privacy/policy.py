"""A node's own privacy policy: what the node, not the server, decides.

The server's run config is a *proposal*. Every parameter that shapes a data owner's
guarantee is the node's: its δ, its ε budget, the neighbouring relation, its held-out
split, whether its evaluation replies are DP releases, the task limits that shape what
is counted (``max-seq-length``), the base models it will load, and canaries (never on
a deployed node). A deployed node reads its policy from its command line and from
``STATE_DIR/policy.toml``; a simulated client gets the same object filled from the
run config, so both paths run the same checks.

SKELETON (coordination commit): the fields below are the contract between the
policy work (enforcement, deploy flags, audit) and the DP evaluation work; the
enforcement and the file format are filled in by the policy work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["DEFAULT_DELTA", "EvaluationPolicy", "ModelPin", "NodePolicy"]

#: The δ a node uses when it has no policy of its own (and never more than 1 / n_k).
DEFAULT_DELTA = 1e-5

EvaluationPolicy = Literal["dp", "exact"]


@dataclass(frozen=True)
class ModelPin:
    """A base model a node will load: its directory and the SHA-256 of its files."""

    path: str
    sha256: str


@dataclass(frozen=True)
class NodePolicy:
    """What a node decides for itself (see the module docstring).

    Attributes
    ----------
    delta : float
        The node's δ: ledgers, budget checks and the audit use it, never the server's.
    epsilon_budget : float
        The ε the node will not exceed over all runs on its data.
    relation : str
        The neighbouring relation; fedtune nodes publish ``n_k``, so ``"replace-one"``.
    test_fraction : float
        The node's held-out fraction; its split is fixed once per data set.
    evaluation : "dp" | "exact"
        ``"dp"`` (default with DP on): a held-out reply is a noised, accounted
        release; ``"exact"``: the node opts out and sends exact metrics (the ledger
        records it, the audit shows it).
    eval_noise_multiplier : float
        σ of a DP evaluation release, in units of its L2 sensitivity.
    max_seq_length : int | None
        The token limit the node accepts (``None``: the run config's, in simulation).
    models : tuple[ModelPin, ...]
        Base models the node will load; empty: only the bundled defaults.
    canaries : bool
        Audit canaries allowed (simulation only).
    max_step_slack : float
        The key holder's movement bound is this times the bound derived from the
        config (:mod:`fedtune.movement`); the run config cannot lower or remove it.
    """

    delta: float = DEFAULT_DELTA
    epsilon_budget: float = 8.0
    relation: Literal["replace-one"] = "replace-one"
    test_fraction: float = 0.2
    evaluation: EvaluationPolicy = "dp"
    eval_noise_multiplier: float = 5.0
    max_seq_length: int | None = None
    models: tuple[ModelPin, ...] = field(default_factory=tuple)
    canaries: bool = False
    max_step_slack: float = 2.0
