"""A node's own privacy policy: what the node, not the server, decides.

The server's run config is a *proposal*. Every parameter that shapes a data owner's
guarantee is the node's: its δ, its ε budget, the neighbouring relation, its held-out
split, whether its evaluation replies are DP releases, the task limits that shape what
is counted (``max-seq-length``), the base models it will load, and canaries (never on
a deployed node). A deployed node reads its policy from ``STATE_DIR/policy.toml`` and
its command line (:mod:`fedtune.privacy.policy_file`); a simulated client gets the same
object filled from the run config (:meth:`NodePolicy.from_run_config`), so both paths
run the same checks (:meth:`NodePolicy.check_run`, :meth:`NodePolicy.check_examples`).

A run outside the policy is refused before any training with a :class:`PolicyError`
of one line naming the key, the server's value and the node's. The one exception is
``model-path``: its refusal is a fixed text that never depends on the node's file
system, so a server cannot probe which paths exist on a node.

Why δ < 1 / n_k: an (ε, δ) guarantee with δ ≥ 1/n is met by a mechanism that
publishes one of the n examples in the clear (Dwork & Roth 2014, "The Algorithmic
Foundations of Differential Privacy", §2.3), so such a δ promises nothing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from fedtune.errors import PolicyError
from fedtune.identity import ANY, public_key_text

if TYPE_CHECKING:
    from fedtune.config import RunConfig

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_DELTA",
    "DEFAULT_MAX_SEQ_LENGTH",
    "DEFAULT_TEST_FRACTION",
    "MODEL_REFUSAL",
    "EvaluationPolicy",
    "ModelPin",
    "NodePolicy",
    "PolicySource",
]

#: The δ a node uses when it has no policy of its own (and never more than 1 / n_k).
DEFAULT_DELTA = 1e-5
#: The ε budget of a node without a policy of its own.
DEFAULT_BUDGET = 8.0
#: The held-out fraction and token limit of a node without a policy (the config defaults).
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_MAX_SEQ_LENGTH = 48

EvaluationPolicy = Literal["dp", "exact"]
PolicySource = Literal["node", "run-config"]

#: The one refusal of a server-chosen ``model-path`` (fixed: it reveals nothing of the node).
MODEL_REFUSAL = (
    "node policy: the run config's `model-path` is not a base model this node's policy "
    "lists; the node loads only its pinned models (`fedtune deploy supernode --model DIR`) "
    'or the bundled default (`model-path` = "").'
)


def _hex64(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


@dataclass(frozen=True)
class ModelPin:
    """A base model a node will load: its directory and the SHA-256 of its files.

    ``path`` is absolute and normalised (compared as text: the node never looks up a
    server-chosen path); ``sha256`` is :func:`fedtune.model.loading.model_digest` of it.
    """

    path: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not os.path.isabs(self.path):
            raise PolicyError(
                f"models: `path` must be an absolute directory, got {self.path!r}; pin "
                "models with `fedtune deploy supernode --model DIR`."
            )
        if os.path.normpath(self.path) != self.path:
            raise PolicyError(
                f"models: `path` {self.path!r} is not normalised; write "
                f"{os.path.normpath(self.path)!r}."
            )
        if not _hex64(self.sha256):
            raise PolicyError(
                f"models: `sha256` of {self.path!r} must be 64 lowercase hex digits, got "
                f"{self.sha256!r}; `fedtune deploy supernode --model DIR` computes it."
            )


@dataclass(frozen=True)
class NodePolicy:
    """What a node decides for itself (see the module docstring).

    Attributes
    ----------
    delta : float
        The node's δ: ledgers, budget checks, σ calibration and the audit use it,
        never the server's. Must lie in (0, 1); at run time also below ``1 / n_k``.
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
    source : "node" | "run-config"
        ``"node"``: a deployed node's own policy (its pins are enforced);
        ``"run-config"``: a simulated client's, filled from the run config.
    max_step_slack : float
        The key holder's movement bound is this times the bound derived from the
        config (:mod:`fedtune.movement`); the run config cannot lower or remove it.
    peers : tuple[str, ...] | "any"
        The other data owners' node public keys (:mod:`fedtune.identity`): the only
        members this node accepts in a multiparty key ceremony's roster. Empty (the
        default): the node refuses the ceremony; ``"any"``: it trusts the server's roster.
    """

    delta: float = DEFAULT_DELTA
    epsilon_budget: float = DEFAULT_BUDGET
    relation: Literal["replace-one"] = "replace-one"
    test_fraction: float = DEFAULT_TEST_FRACTION
    evaluation: EvaluationPolicy = "dp"
    eval_noise_multiplier: float = 10.0
    max_seq_length: int | None = None
    models: tuple[ModelPin, ...] = field(default_factory=tuple)
    canaries: bool = False
    source: PolicySource = "node"
    max_step_slack: float = 2.0
    peers: tuple[str, ...] | Literal["any"] = ()

    def __post_init__(self) -> None:
        _real("delta", self.delta, 0.0 < _num(self.delta) < 1.0, "must be in (0, 1)")
        _real(
            "epsilon-budget",
            self.epsilon_budget,
            0.0 < _num(self.epsilon_budget) < math.inf,
            "must be a finite ε > 0",
        )
        if self.relation != "replace-one":
            raise PolicyError(
                f"node policy `relation` must be 'replace-one' (a fedtune node publishes its "
                f"example count n_k), got {self.relation!r}."
            )
        _real(
            "test-fraction",
            self.test_fraction,
            0.0 < _num(self.test_fraction) < 1.0,
            "must be in (0, 1)",
        )
        if self.evaluation not in get_args(EvaluationPolicy):
            raise PolicyError(
                f"node policy `evaluation` must be one of dp, exact, got {self.evaluation!r}."
            )
        _real(
            "eval-noise-multiplier",
            self.eval_noise_multiplier,
            0.0 < _num(self.eval_noise_multiplier) < math.inf,
            "must be finite and > 0",
        )
        msl = self.max_seq_length
        if msl is not None and (isinstance(msl, bool) or not isinstance(msl, int) or msl < 8):
            raise PolicyError(f"node policy `max-seq-length` must be an integer >= 8, got {msl!r}.")
        if not isinstance(self.models, tuple) or not all(
            isinstance(m, ModelPin) for m in self.models
        ):
            raise PolicyError(f"node policy `models` must be ModelPins, got {self.models!r}.")
        if not isinstance(self.canaries, bool):
            raise PolicyError(f"node policy `canaries` must be a bool, got {self.canaries!r}.")
        _real(
            "max-step-slack",
            self.max_step_slack,
            0.0 < _num(self.max_step_slack) < math.inf,
            "must be finite and > 0 (the movement bound's factor, fedtune.movement)",
        )
        if self.peers != ANY:
            if not isinstance(self.peers, tuple) or any(
                public_key_text(p, where="node policy `peers`") != p for p in self.peers
            ):
                raise PolicyError(
                    f"node policy `peers` must be node public keys or 'any', got {self.peers!r}.",
                    key="peers",
                )
            if len(set(self.peers)) != len(self.peers):
                raise PolicyError("node policy `peers` pins one key twice; remove the copy.")
        if self.source not in get_args(PolicySource):
            raise PolicyError(
                f"node policy `source` must be 'node' or 'run-config', got {self.source!r}."
            )

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> NodePolicy:
        """A simulated client's policy: the run config's values (the operator is the owner)."""
        return cls(
            delta=cfg.privacy.target_delta,
            epsilon_budget=cfg.privacy.budget,
            test_fraction=cfg.data.test_fraction,
            max_seq_length=cfg.data.max_seq_length,
            canaries=cfg.privacy.audit_canaries > 0,
            evaluation=cfg.privacy.evaluation,
            eval_noise_multiplier=cfg.privacy.eval_noise_multiplier,
            source="run-config",
        )

    def check_run(self, cfg: RunConfig) -> None:
        """Refuse (:class:`PolicyError`) a run config that asks for more than this policy.

        Checked: ``target-delta`` (not above the node's δ), ``test-fraction`` and
        ``max-seq-length`` (the node's own), ``audit-canaries`` and ``model-path``
        (pinned models only, :data:`MODEL_REFUSAL`). The node's δ and budget are what
        the node then uses, whatever the run config's ``target-*`` / ``epsilon-budget``.
        """
        if cfg.privacy.target_delta > self.delta:
            _refuse("target-delta", cfg.privacy.target_delta, "delta", self.delta)
        if cfg.data.test_fraction != self.test_fraction:
            _refuse("test-fraction", cfg.data.test_fraction, "test-fraction", self.test_fraction)
        if self.max_seq_length is not None and cfg.data.max_seq_length != self.max_seq_length:
            _refuse(
                "max-seq-length", cfg.data.max_seq_length, "max-seq-length", self.max_seq_length
            )
        if cfg.privacy.enabled and cfg.privacy.evaluation == "exact" != self.evaluation:
            _refuse("evaluation", cfg.privacy.evaluation, "evaluation", self.evaluation)
        if (
            cfg.privacy.enabled
            and self.evaluation == "dp"
            and cfg.privacy.eval_noise_multiplier < self.eval_noise_multiplier
        ):
            _refuse(
                "eval-noise-multiplier",
                cfg.privacy.eval_noise_multiplier,
                "eval-noise-multiplier",
                self.eval_noise_multiplier,
            )
        if cfg.privacy.audit_canaries and not self.canaries:
            raise PolicyError(
                f"node policy: the run config's `audit-canaries` = {cfg.privacy.audit_canaries}"
                " but this node allows no canaries (simulations only); remove it.",
                key="audit-canaries",
            )
        if self.source == "node":
            self.model_pin(cfg.model.model_path)

    def model_pin(self, model_path: str) -> ModelPin | None:
        """The pin of a server-chosen ``model-path`` (``None``: the bundled default).

        Compared as text only: the node never touches a path the server chose, so the
        refusal (:data:`MODEL_REFUSAL`) is the same whether or not the path exists.
        """
        if not model_path:
            return None
        wanted = os.path.normpath(model_path) if os.path.isabs(model_path) else None
        for pin in self.models:
            if pin.path == wanted:
                return pin
        raise PolicyError(MODEL_REFUSAL, key="model-path")

    def check_examples(self, num_examples: int) -> None:
        """Refuse a δ that is not below ``1 / n_k`` (see the module docstring)."""
        if num_examples >= 1 and self.delta * num_examples >= 1.0:
            raise PolicyError(
                f"node policy: `delta` = {self.delta:g} is not below 1 / n_k = "
                f"1/{num_examples} (such a δ allows publishing an example in the clear); "
                f"give the node a δ below {1.0 / num_examples:.3g}.",
                key="delta",
            )


def _num(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _real(key: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise PolicyError(f"node policy `{key}` {expected}, got {value!r}.")


def _refuse(key: str, server: object, node_key: str, node: object) -> None:
    raise PolicyError(
        f"node policy: the run config's `{key}` = {server!r}, this node's `{node_key}` is "
        f"{node!r}; the node refuses the run (submit it with `{key}` = {node!r}).",
        key=key,
    )
