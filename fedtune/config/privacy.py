"""Differential privacy, enforced and accounted by each client (``dp``, ``target-*``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
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

    dp: DPLevel = field(
        default="off",
        metadata={
            "help": "`off`, `example` (DP-SGD per example with Opacus) or `client` (each "
            "client clips its whole update and adds its share of the noise; needs "
            "`encryption = true`)."
        },
    )
    target_epsilon: float = field(
        default=8.0,
        metadata={
            "help": "The ε a client's examples (at client level, a client) get over the "
            "whole run (> 0)."
        },
    )
    target_delta: float = field(
        default=1e-5, metadata={"help": "The δ of `target-epsilon`, in (0, 1)."}
    )
    noise_multiplier: float = field(
        default=0.0,
        metadata={
            "help": "σ; 0 = calibrate once so that full participation in `num-rounds` ends "
            "at or under `target-epsilon`."
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": 'Clip norm C: per example (`dp = "example"`) or per update (`dp = "client"`).'
        },
    )
    accountant: AccountantName = field(
        default="prv",
        metadata={
            "help": "`prv` (Gopi et al. 2021) or `rdp` (Mironov 2017; looser under "
            "replace-one), both under the replace-one relation."
        },
    )
    epsilon_budget: float = field(
        default=0.0,
        metadata={
            "help": "The ε a client will not exceed (it declines a round that would); "
            "0 = `target-epsilon`."
        },
    )
    client_dp_tolerance: int = field(
        default=1,
        metadata={
            "help": '`dp = "client"`: sampled clients per round that may drop out or '
            "collude while the sum keeps its σ."
        },
    )
    seeded_noise: bool = field(
        default=False,
        metadata={
            "help": "Simulations only: draw DP noise from the run seed (reproducible; "
            "recorded in the ledger, marked by the audit, refused by a deployed node)."
        },
    )
    audit_canaries: int = field(
        default=0,
        metadata={
            "help": "Simulations only: train every client with this many gradient canaries "
            "for a one-run empirical audit (`fedtune audit` then reports an ε lower bound); "
            'refused by a deployed node and with `dp = "client"`.'
        },
    )
    evaluation: EvaluationMode = field(
        default="dp",
        metadata={
            "help": "With DP on, a held-out reply is a DP release (`dp`) or exact metrics "
            "(`exact`, recorded in the ledger as unaccounted); a deployed node refuses "
            "`exact` when its policy says `dp`."
        },
    )
    eval_noise_multiplier: float = field(
        default=10.0,
        metadata={
            "help": "σ of a DP held-out release in units of its sensitivity (> 0); a "
            "deployed node refuses a smaller one than its own."
        },
    )
    dp_noise: DPNoise = field(
        default="grid",
        metadata={
            "help": "DP-SGD noise: `grid` (clipped examples rounded to a power-of-two grid "
            "plus an exact discrete Gaussian; ε proven by the `discrete-rdp` accountant) or "
            "`float` (float64 Gaussian, ε from `accountant`, no proven bound for the float "
            "mechanism; docs/float-noise.md)."
        },
    )

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
    def dp_evaluation(self) -> bool:
        """True when held-out metrics are DP releases (DP on and ``evaluation = "dp"``)."""
        return self.enabled and self.evaluation == "dp"

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
