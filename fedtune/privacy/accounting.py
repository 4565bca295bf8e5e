"""Privacy accounting for the Poisson-subsampled Gaussian mechanism.

A client's privacy loss is the composition of every DP-SGD step it has ever run on its
data. :class:`AccountantState` keeps that whole history as a list of compositions
``(noise_multiplier, sample_rate, steps)`` -- one per round -- and evaluates it with
Opacus' own accountants by setting their ``history`` list, so ε composes over the whole
run instead of restarting with a fresh ``PrivacyEngine`` every round.

Two accountants are offered, both upper bounds on ε for a given δ:

``"prv"``
    Numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz,
    NeurIPS 2021, https://arxiv.org/abs/2106.02848). Tightest; the value returned is
    Opacus' ``eps_upper`` = estimate + ``PRV_EPS_ERROR``, i.e. it already includes the
    discretisation error.
``"rdp"``
    Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019,
    https://arxiv.org/abs/1908.10530) converted to (ε, δ). Looser, analytic, fast.

Gaussian DP (Opacus' ``"gdp"`` accountant) is deliberately **not** offered. It rests on
a central-limit approximation of the composed privacy loss (Bu, Dong, Long & Su 2020,
https://arxiv.org/abs/1911.11607) that only becomes exact as the number of steps goes
to infinity with ``q·sqrt(steps)`` fixed; for the finite, often small step counts of a
federated round it can *underestimate* ε (Opacus itself warns "GDP accounting is
experimental and can underestimate privacy expenditure", and Gopi et al. 2021, Fig. 1,
show the gap). A budget must be enforced with an upper bound, so GDP is not one.

Opacus is imported inside the functions: importing it calls ``logging.basicConfig``,
which a library must not do at import time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedtune.privacy._checks import (
    check_delta,
    check_epsilon,
    check_positive,
    check_positive_int,
    check_sample_rate,
)

__all__ = [
    "ACCOUNTANTS",
    "PRV_EPS_ERROR",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "RELATIONS",
    "Accountant",
    "AccountantState",
    "BudgetCheck",
    "Composition",
    "Relation",
    "calibrate_noise",
    "check_budget",
    "compute_epsilon",
    "epsilon_after",
]

Accountant = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")

Relation = Literal["replace-one", "add-remove"]
RELATIONS: tuple[str, ...] = ("replace-one", "add-remove")
"""Neighbouring relations: ``replace-one`` (same size, one example swapped; what fedtune
runs, since ``n_k`` is public) and ``add-remove`` (Opacus' own analysis)."""

PRV_EPS_ERROR = 0.01
"""Absolute ε discretisation error asked of the PRV accountant (Opacus' default)."""

MAX_PRV_DOMAIN_POINTS = 5_000_000
"""Largest PRV discretisation grid evaluated (about 7 s and a few hundred MB).

The grid grows like ``L·sqrt(steps)/eps_error`` where ``L`` is an RDP bound on the
privacy loss, so a very small σ over many steps asks for 10⁸+ points and exhausts
memory (measured: σ=0.5, q=0.5, 2000 steps → 5·10⁷ points). Beyond this size the PRV
accountant answers ``inf``: a vacuous but valid upper bound for a mechanism that gives
no meaningful privacy anyway.
"""

SIGMA_MIN = 0.1
"""Smallest noise multiplier :func:`calibrate_noise` searches (below it ε is huge)."""

SIGMA_MAX = 1e4
"""Largest noise multiplier :func:`calibrate_noise` searches."""


@dataclass(frozen=True)
class Composition:
    """``steps`` steps of the Gaussian mechanism with Poisson sampling rate ``sample_rate``.

    Each step releases ``sum_i clip(g_i) + N(0, (noise_multiplier·C)² I)`` over a batch in
    which every example is included independently with probability ``sample_rate``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "noise_multiplier", check_positive("noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(self, "sample_rate", check_sample_rate("sample_rate", self.sample_rate))
        object.__setattr__(self, "steps", check_positive_int("steps", self.steps))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class AccountantState:
    """The full composition history of one data owner, oldest first.

    Immutable: :meth:`compose` returns a new state. Floats survive the JSON round trip
    exactly, so ``AccountantState.from_dict(s.to_dict()) == s``.
    """

    compositions: tuple[Composition, ...] = ()

    def compose(
        self, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> AccountantState:
        """Return the state after ``steps`` more steps of ``(noise_multiplier, sample_rate)``."""
        step = Composition(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return AccountantState(self.compositions + (step,))

    @property
    def total_steps(self) -> int:
        """Number of mechanism invocations composed so far."""
        return sum(c.steps for c in self.compositions)

    def opacus_history(self) -> list[tuple[float, float, int]]:
        """Return the history as Opacus accountants store it.

        Adjacent compositions with the same ``(noise_multiplier, sample_rate)`` are
        merged exactly as ``PRVAccountant.step`` / ``RDPAccountant.step`` merge them, so
        the ε computed here is the one a single long-lived Opacus accountant would
        report after running every round.
        """
        history: list[tuple[float, float, int]] = []
        for c in self.compositions:
            if history and history[-1][0] == c.noise_multiplier and history[-1][1] == c.sample_rate:
                sigma, q, n = history[-1]
                history[-1] = (sigma, q, n + c.steps)
            else:
                history.append((c.noise_multiplier, c.sample_rate, c.steps))
        return history

    def epsilon(self, *, delta: float, accountant: Accountant, relation: Relation) -> float:
        """Return the ε (an upper bound) spent so far at ``delta``; 0.0 for no history."""
        return compute_epsilon(
            self.opacus_history(), delta=delta, accountant=accountant, relation=relation
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (``{"history": [{...}, ...]}``)."""
        return {"history": [c.to_dict() for c in self.compositions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccountantState:
        """Inverse of :meth:`to_dict`; validates every entry."""
        history = data.get("history") if isinstance(data, Mapping) else None
        if not isinstance(history, Sequence) or isinstance(history, str):
            raise ValueError(f"`history` must be a list of compositions, got {history!r}.")
        comps = []
        for i, entry in enumerate(history):
            if not isinstance(entry, Mapping) or set(entry) != {
                "noise_multiplier",
                "sample_rate",
                "steps",
            }:
                raise ValueError(
                    f"`history[{i}]` must have exactly the keys noise_multiplier, "
                    f"sample_rate, steps; got {entry!r}."
                )
            comps.append(Composition(**entry))
        return cls(tuple(comps))

    def __len__(self) -> int:
        return len(self.compositions)


_GUARD_ORDERS = [float(a) for a in range(2, 65)] + [80.0, 96.0, 128.0, 192.0, 256.0]
_GUARD_SMALL_ORDERS = [1.1, 1.25, 1.5, 1.75]


def _rdp_epsilon(
    history: list[tuple[float, float, int]], *, delta: float, relation: Relation, coarse: bool
) -> float:
    """ε at ``delta`` of the summed RDP curve of ``history`` under ``relation``.

    ``coarse`` (add-remove only) uses integer orders, which have a closed form: the
    domain-size guard below needs an upper bound fast, and fewer orders only loosen it.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    from fedtune.privacy.analysis import REPLACE_ONE_RDP_ORDERS, replace_one_rdp

    if relation == "replace-one":
        orders: list[float] = list(REPLACE_ONE_RDP_ORDERS)
        rdp = sum(replace_one_rdp(q, s, n, orders) for s, q, n in history)
    else:
        if coarse:
            orders = list(_GUARD_ORDERS)
            if min(s for s, _, _ in history) < 2:
                orders = _GUARD_SMALL_ORDERS + orders
        else:
            from opacus.accountants.rdp import RDPAccountant

            orders = list(RDPAccountant.DEFAULT_ALPHAS)
        rdp = sum(
            rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders)
            for s, q, n in history
        )
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _prv_half_width(
    history: list[tuple[float, float, int]], delta_error: float, relation: Relation
) -> float:
    """Half-width ``L`` of the PRV discretisation domain (Gopi et al. 2021, Remark 5.6).

    Same formula as ``opacus.accountants.analysis.prv.compute_safe_domain_size``, with
    the RDP bound of ``relation`` (for add-remove on integer orders only: fewer orders
    can only make ``L`` larger, and fractional ones are a slow series).
    """
    total = sum(n for _, _, n in history)
    half_width = _rdp_epsilon(history, delta=delta_error / 4, relation=relation, coarse=True)
    for s, q, _ in history:
        eps_one = _rdp_epsilon(
            [(s, q, 1)], delta=delta_error / (8 * total), relation=relation, coarse=True
        )
        half_width = max(half_width, eps_one)
    return max(float(half_width), PRV_EPS_ERROR) + 3


def _prv_mesh(history: list[tuple[float, float, int]], delta_error: float) -> float:
    total = sum(n for _, _, n in history)
    return PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2)


def _replace_one_prv_epsilon(
    history: list[tuple[float, float, int]], *, delta: float, delta_error: float, half_width: float
) -> float:
    """PRV composition (Opacus' discretise-and-FFT code) of replace-one steps."""
    from opacus.accountants.analysis.prv import (
        Domain,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    from fedtune.privacy.analysis import ReplaceOneGaussianPRV

    domain = Domain.create_aligned(-half_width, half_width, _prv_mesh(history, delta_error))
    prvs = [ReplaceOneGaussianPRV(q, s) for s, q, _ in history]
    tprvs = [TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs]  # type: ignore[arg-type]
    dprvs = [discretize(t, domain) for t in tprvs]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=[n for *_, n in history])
    _, _, eps_upper = composed.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
    return float(eps_upper)


def compute_epsilon(
    history: Sequence[tuple[float, float, int]],
    *,
    delta: float,
    accountant: Accountant,
    relation: Relation,
) -> float:
    """Return ε at ``delta`` for an Opacus-style history ``[(sigma, q, steps), ...]``.

    Parameters
    ----------
    history
        Compositions as Opacus accountants store them.
    delta
        Target δ in (0, 1).
    accountant
        ``"prv"`` or ``"rdp"`` (see the module docstring for why not ``"gdp"``).
    relation
        ``"replace-one"`` (what fedtune clients run: :mod:`fedtune.privacy.analysis`)
        or ``"add-remove"`` (Opacus' own accountants).

    Returns
    -------
    float
        An upper bound on ε; ``inf`` when the PRV grid would be too large (see
        :data:`MAX_PRV_DOMAIN_POINTS`) or the PRV numerics fail.
    """
    delta = check_delta("delta", delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
    if relation not in RELATIONS:
        raise ValueError(f"`relation` must be one of {RELATIONS}, got {relation!r}.")
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant

    # Opacus' RDP code warns when the optimal order sits at the edge of its alpha grid:
    # the bound is then merely looser, never wrong, so the warning is noise here.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if accountant == "rdp":
            return _rdp_epsilon(history, delta=delta, relation=relation, coarse=False)
        delta_error = delta / 1000  # Opacus' default for PRVAccountant.get_epsilon
        half_width = _prv_half_width(history, delta_error, relation)
        if 2 * half_width / _prv_mesh(history, delta_error) > MAX_PRV_DOMAIN_POINTS:
            return math.inf
        try:
            if relation == "replace-one":
                eps = _replace_one_prv_epsilon(
                    history, delta=delta, delta_error=delta_error, half_width=half_width
                )
            else:
                prv = PRVAccountant()
                prv.history = history
                eps = float(
                    prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error)
                )
        except (RuntimeError, ValueError):  # "Cannot compute epsilon", mean mismatch, fp
            return math.inf
    return eps if math.isfinite(eps) else math.inf


def epsilon_after(
    state: AccountantState,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant,
    relation: Relation,
) -> float:
    """Return the ε ``state`` would have after one more round of ``steps`` steps.

    Use it before training: if the result exceeds the budget, refuse the round.
    """
    after = state.compose(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return after.epsilon(delta=delta, accountant=accountant, relation=relation)


@dataclass(frozen=True)
class BudgetCheck:
    """Outcome of :func:`check_budget`."""

    spent_epsilon: float
    """ε already spent (before the planned round)."""
    epsilon_after: float
    """ε after the planned round."""
    budget_epsilon: float
    delta: float
    accountant: str

    @property
    def would_exceed(self) -> bool:
        """True when the planned round would take ε above the budget."""
        return self.epsilon_after > self.budget_epsilon

    @property
    def remaining_epsilon(self) -> float:
        """Budget left before the planned round (never negative)."""
        return max(0.0, self.budget_epsilon - self.spent_epsilon)


def check_budget(
    state: AccountantState,
    *,
    budget_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant,
    relation: Relation,
) -> BudgetCheck:
    """Say whether one more round of ``steps`` steps fits in ``budget_epsilon``."""
    budget_epsilon = check_epsilon("budget_epsilon", budget_epsilon)
    after = epsilon_after(
        state,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=accountant,
        relation=relation,
    )
    return BudgetCheck(
        spent_epsilon=state.epsilon(delta=delta, accountant=accountant, relation=relation),
        epsilon_after=after,
        budget_epsilon=budget_epsilon,
        delta=delta,
        accountant=accountant,
    )


def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant,
    relation: Relation,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Return the noise multiplier σ for which ``steps`` steps at rate ``sample_rate`` end at
    or under ``target_epsilon``.

    The result σ* satisfies ``ε(σ*) <= target_epsilon`` -- checked with the same
    accountant, never assumed -- and ``ε(σ*) >= target_epsilon - epsilon_tolerance``
    unless σ* is :data:`SIGMA_MIN`, the bottom of the search range (targets so loose that
    any σ ≥ 0.1 meets them).

    The search brackets σ by geometric steps, then runs the Illinois variant of regula
    falsi on ``(log σ, log ε)``, where ε(σ) is close to a power law; it keeps the upper
    end of the bracket, whose ε has been evaluated and is ``<= target_epsilon``. Like
    Opacus' ``get_noise_multiplier`` but with a guaranteed side and ~8 evaluations
    instead of ~20 (PRV costs 0.05-2 s per evaluation).

    Parameters
    ----------
    target_epsilon, target_delta
        The (ε, δ) budget for the whole planned training (all rounds × local steps).
    sample_rate
        Poisson sampling rate q = expected batch size / dataset size.
    steps
        Total number of noisy steps planned.
    accountant
        ``"prv"`` (tightest) or ``"rdp"``.
    relation
        ``"replace-one"`` or ``"add-remove"`` (see :func:`compute_epsilon`).
    epsilon_tolerance
        Absolute slack allowed below the target.

    Raises
    ------
    ValueError
        On invalid inputs, or when even σ = :data:`SIGMA_MAX` exceeds the target.
    """
    target = check_epsilon("target_epsilon", target_epsilon)
    delta = check_delta("target_delta", target_delta)
    q = check_sample_rate("sample_rate", sample_rate)
    steps = check_positive_int("steps", steps)
    tol = check_positive("epsilon_tolerance", epsilon_tolerance)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")

    def eps_of(sigma: float) -> float:
        return compute_epsilon(
            [(sigma, q, steps)], delta=delta, accountant=accountant, relation=relation
        )

    # Bracket: lo has ε > target (or is the floor), hi has ε <= target (verified).
    sigma, eps = 1.0, eps_of(1.0)
    if eps <= target:
        hi, e_hi = sigma, eps
        lo, e_lo = hi / 4, eps_of(hi / 4)
        while e_lo <= target:
            hi, e_hi = lo, e_lo
            if lo <= SIGMA_MIN:
                return hi  # the floor of the search range already meets the target
            lo = max(SIGMA_MIN, lo / 4)
            e_lo = eps_of(lo)
    else:
        lo, e_lo = sigma, eps
        hi = sigma
        while True:
            # ε(σ) ~ 1/σ for large σ: jump by the ratio, at least ×2, at most ×100.
            ratio = e_lo / target if math.isfinite(e_lo) else 4.0
            hi = min(SIGMA_MAX, hi * min(100.0, max(2.0, 1.2 * ratio)))
            e_hi = eps_of(hi)
            if e_hi <= target:
                break
            if hi >= SIGMA_MAX:
                raise ValueError(
                    f"`target_epsilon`={target} is unreachable for sample_rate={q}, "
                    f"steps={steps}, delta={delta}: σ={SIGMA_MAX:g} still gives ε={e_hi:.4g}. "
                    "Raise the budget, lower the sample rate or run fewer steps."
                )
            lo, e_lo = hi, e_hi

    log_t = math.log(target)
    a, fa = math.log(lo), (math.log(e_lo) - log_t) if math.isfinite(e_lo) else math.inf
    b, fb = math.log(hi), math.log(e_hi) - log_t if e_hi > 0 else -math.inf
    side = 0
    for _ in range(100):
        if target - e_hi <= tol or b - a < 1e-9:
            break
        if math.isfinite(fa) and math.isfinite(fb) and fa != fb:
            c = (a * fb - b * fa) / (fb - fa)
            # keep the probe strictly inside the bracket so it always shrinks
            c = min(max(c, a + 1e-3 * (b - a)), b - 1e-3 * (b - a))
        else:
            c = (a + b) / 2
        sigma = math.exp(c)
        eps = eps_of(sigma)
        fc = (math.log(eps) - log_t) if 0 < eps < math.inf else (math.inf if eps > 0 else -math.inf)
        if eps <= target:
            b, fb, hi, e_hi = c, fc, sigma, eps
            if side == -1:
                fa /= 2
            side = -1
        else:
            a, fa = c, fc
            if side == +1:
                fb /= 2
            side = +1
    return hi
