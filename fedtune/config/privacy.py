"""Differential privacy, enforced and accounted by each client (``dp``, ``target-*``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fedtune.config._checks import choice, require

__all__ = ["AccountantName", "DPLevel", "DPNoise", "EvaluationMode", "PrivacyConfig"]

DPLevel = Literal["off", "example", "client"]
AccountantName = Literal["prv", "rdp"]
EvaluationMode = Literal["dp", "exact"]
DPNoise = Literal["grid", "float"]


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy, enforced and accounted by each client.

    ``dp = "example"``: DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133)
    with Opacus: Poisson sampling at ``q = batch-size / n_k``, per-example clipping
    to ``max-grad-norm``, Gaussian noise ``σ · max-grad-norm``. ``dp = "client"``:
    each client clips its whole update to ``max-grad-norm`` and adds its share
    ``σ C / sqrt(m)`` of the noise, so the sum over ``m`` sampled clients carries
    ``σ C`` (DP-FedAvg, McMahan et al. 2018, https://arxiv.org/abs/1710.06963).

    ``noise-multiplier = 0`` calibrates σ once so that full participation over
    ``num-rounds`` ends at or under ``target-epsilon`` (at ``target-delta``). A
    client declines a round that would take it over ``epsilon-budget``
    (``0`` = ``target-epsilon``). GDP is not offered: its CLT approximation is not
    an upper bound on ε for finite step counts.

    ε is accounted under the replace-one relation: a client publishes its example
    count ``n_k`` (the FedAvg weight), so its neighbouring data sets have the same
    size. With ``dp = "client"`` the server chooses the clients, so a round is not
    amplified by sampling (``q = 1``); each of the ``m`` sampled clients adds a share
    ``σ C / sqrt(m - t)`` with ``t = client-dp-tolerance``, so the sum keeps its σ when
    up to ``t`` sampled clients drop out or collude (Kairouz, Liu & Steinke 2021), and
    the server refuses a round with fewer than ``m - t`` shares. Client-level DP needs
    ``encryption = true``: without it the server would see each update with only its
    own share of the noise.

    Noise comes from a CSPRNG (:mod:`fedtune.privacy.noise`); ``seeded-noise = true``
    draws it from the run seed instead, for reproducible simulations only: the ledger
    records it, the audit marks it, and a deployed node refuses it.

    ``audit-canaries = m`` (simulations only; a deployed node refuses it) trains every
    client with ``m`` gradient canaries for one-run privacy auditing
    (:mod:`fedtune.privacy.canaries`); ``fedtune audit`` then reports an empirical
    lower bound on ε beside the claimed one.

    ``dp-noise = "grid"`` (default) makes DP-SGD's release float-safe: clipped examples
    rounded to a power-of-two grid, summed exactly, plus exact discrete Gaussian noise,
    accounted with ``"discrete-rdp"``, the accountant proven for it, whatever
    ``accountant`` says (looser than PRV: calibrated σ is about 1.5x higher for the
    same ε). ``"float"`` adds float64 Gaussian noise, accounted with ``accountant`` as
    the ideal continuous mechanism, with no proven bound for the float one
    (``docs/float-noise.md``). Client-level shares are always on the grid.

    ``evaluation = "dp"`` (with DP on) makes every held-out reply a Gaussian release of
    bounded per-example sums at ``eval-noise-multiplier``, accounted with training
    (:mod:`fedtune.privacy.evaluation`); ``"exact"`` sends exact held-out metrics,
    recorded in the ledger as unaccounted. In simulation these fill each client's
    :class:`~fedtune.privacy.policy.NodePolicy`; a deployed node keeps its own and
    refuses a run asking for less (``"exact"``, or a smaller σ).
    """

    dp: DPLevel = "off"
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    accountant: AccountantName = "prv"
    epsilon_budget: float = 0.0
    client_dp_tolerance: int = 1
    seeded_noise: bool = False
    audit_canaries: int = 0
    evaluation: EvaluationMode = "dp"
    eval_noise_multiplier: float = 10.0
    dp_noise: DPNoise = "grid"

    def __post_init__(self) -> None:
        choice("dp", self.dp, get_args(DPLevel))
        require(
            self.audit_canaries >= 0,
            "audit-canaries",
            self.audit_canaries,
            "must be >= 0 (0 = no canaries; simulations only)",
        )
        require(
            self.audit_canaries == 0 or self.dp != "client",
            "audit-canaries",
            self.audit_canaries,
            'needs dp = "example" or "off": its gradient canaries audit DP-SGD',
        )
        require(self.target_epsilon > 0, "target-epsilon", self.target_epsilon, "must be > 0")
        require(
            0.0 < self.target_delta < 1.0, "target-delta", self.target_delta, "must be in (0, 1)"
        )
        require(
            self.noise_multiplier >= 0,
            "noise-multiplier",
            self.noise_multiplier,
            "must be >= 0 (0 = calibrate from target-epsilon)",
        )
        require(self.max_grad_norm > 0, "max-grad-norm", self.max_grad_norm, "must be > 0")
        choice("accountant", self.accountant, get_args(AccountantName))
        choice("evaluation", self.evaluation, get_args(EvaluationMode))
        choice("dp-noise", self.dp_noise, get_args(DPNoise))
        require(
            self.eval_noise_multiplier > 0,
            "eval-noise-multiplier",
            self.eval_noise_multiplier,
            "must be > 0 (the σ of a DP held-out evaluation release)",
        )
        require(
            self.epsilon_budget >= 0,
            "epsilon-budget",
            self.epsilon_budget,
            "must be >= 0 (0 = target-epsilon)",
        )
        require(
            self.client_dp_tolerance >= 0,
            "client-dp-tolerance",
            self.client_dp_tolerance,
            "must be >= 0 (sampled clients that may drop out or collude per round)",
        )

    @property
    def enabled(self) -> bool:
        """True when some level of DP is on."""
        return self.dp != "off"

    @property
    def mechanism(self) -> str:
        """The noise a training release adds: ``"discrete-gaussian"`` on the grid
        (client level, and example level with ``dp-noise = "grid"``), else ``"gaussian"``."""
        if self.dp == "client" or self.dp_noise == "grid":
            return "discrete-gaussian"
        return "gaussian"

    @property
    def budget(self) -> float:
        """The ε a client will not exceed."""
        return self.epsilon_budget or self.target_epsilon
