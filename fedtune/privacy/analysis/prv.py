"""Privacy loss random variables: the replace-one PRV and the guarded PRV composition.

Numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz, NeurIPS
2021, https://arxiv.org/abs/2106.02848), with Opacus' discretise-and-FFT code. For
add/remove-one, Opacus' own ``PRVAccountant`` is evaluated on the history; for
replace-one, :class:`ReplaceOneGaussianPRV` (the closed-form CDF derived in
:mod:`fedtune.privacy.analysis`) takes the place of Opacus'
``PoissonSubsampledGaussianPRV``.

The ε returned is Opacus' ``eps_upper`` = estimate + :data:`PRV_EPS_ERROR`, i.e. it
already includes the discretisation error. Pure functions; Opacus is imported inside
them (importing it calls ``logging.basicConfig``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.special import erfc

from fedtune.privacy.analysis.rdp import Relation, rdp_epsilon, replace_one_rdp

__all__ = [
    "MAX_PRV_DOMAIN_POINTS",
    "PRV_EPS_ERROR",
    "ReplaceOneGaussianPRV",
    "prv_epsilon",
]

_SQRT2 = math.sqrt(2.0)

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


class ReplaceOneGaussianPRV:
    """Privacy loss random variable of one replace-one Poisson-subsampled Gaussian step.

    Drop-in for Opacus' ``PoissonSubsampledGaussianPRV`` in its PRV composition
    (``cdf`` is all that discretisation and the mean need). ``q = 1`` is the plain
    Gaussian mechanism with sensitivity 2 (in units of ``C``).

    Parameters
    ----------
    sample_rate : float
        Poisson sampling rate ``q`` in (0, 1].
    noise_multiplier : float
        σ, the noise std in units of the clipping bound ``C``.
    """

    def __init__(self, sample_rate: float, noise_multiplier: float) -> None:
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)

    def inverse_loss(self, t: NDArray[np.float64]) -> NDArray[np.float64]:
        """The ``x`` at which the privacy loss equals ``t`` (the quadratic's positive root)."""
        q, s = self.sample_rate, self.noise_multiplier
        t = np.asarray(t, dtype=np.float64)
        qa = q * math.exp(-1.0 / (2 * s * s))
        with np.errstate(over="ignore", under="ignore"):
            em = np.exp(-np.abs(t))  # e^{-|t|}: never overflows
            # t >= 0: divide by e^t; B' = (1-q)(1 - e^-t) >= 0, no cancellation in the
            # form 2c / (b + sqrt(b² + 4ac)).
            b_pos = (1 - q) * (1 - em)
            u_pos = 2 * qa * em / (b_pos + np.sqrt(b_pos * b_pos + 4 * qa * qa * em))
            # t < 0: e^t = em; B = (1-q)(e^t - 1) < 0, so (-B + sqrt(B² + 4AC)) / 2A is stable.
            b_neg = (1 - q) * (em - 1)
            u_neg = (-b_neg + np.sqrt(b_neg * b_neg + 4 * em * qa * qa)) / (2 * em * qa)
        u = np.where(t >= 0, u_pos, u_neg)
        return s * s * np.log(u)

    def cdf(self, t: NDArray[np.float64]) -> NDArray[np.float64]:
        """``Pr[L(X) <= t]`` for ``X ~ P``, i.e. ``Pr[X >= x(t)]``."""
        q, s = self.sample_rate, self.noise_multiplier
        x = self.inverse_loss(t)
        return (1 - q) * erfc(x / (s * _SQRT2)) / 2 + q * erfc((x + 1) / (s * _SQRT2)) / 2

    def rdp(self, alpha: float) -> float:
        """An RDP bound of order ``alpha`` for one step (see :func:`replace_one_rdp`)."""
        return float(replace_one_rdp(self.sample_rate, self.noise_multiplier, 1, [alpha])[0])


def _half_width(
    history: list[tuple[float, float, int]], delta_error: float, relation: Relation
) -> float:
    """Half-width ``L`` of the PRV discretisation domain (Gopi et al. 2021, Remark 5.6).

    Same formula as ``opacus.accountants.analysis.prv.compute_safe_domain_size``, with
    the RDP bound of ``relation`` (for add-remove on integer orders only: fewer orders
    can only make ``L`` larger, and fractional ones are a slow series).
    """
    total = sum(n for _, _, n in history)
    half_width = rdp_epsilon(history, delta=delta_error / 4, relation=relation, coarse=True)
    for s, q, _ in history:
        eps_one = rdp_epsilon(
            [(s, q, 1)], delta=delta_error / (8 * total), relation=relation, coarse=True
        )
        half_width = max(half_width, eps_one)
    return max(float(half_width), PRV_EPS_ERROR) + 3


def _mesh(history: list[tuple[float, float, int]], delta_error: float) -> float:
    total = sum(n for _, _, n in history)
    return PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2)


def _replace_one_epsilon(
    history: list[tuple[float, float, int]], *, delta: float, delta_error: float, half_width: float
) -> float:
    """PRV composition (Opacus' discretise-and-FFT code) of replace-one steps."""
    from opacus.accountants.analysis.prv import (
        Domain,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    domain = Domain.create_aligned(-half_width, half_width, _mesh(history, delta_error))
    prvs = [ReplaceOneGaussianPRV(q, s) for s, q, _ in history]
    tprvs = [TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs]  # type: ignore[arg-type]
    dprvs = [discretize(t, domain) for t in tprvs]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=[n for *_, n in history])
    _, _, eps_upper = composed.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
    return float(eps_upper)


def prv_epsilon(
    history: Sequence[tuple[float, float, int]], *, delta: float, relation: Relation
) -> float:
    """PRV ε upper bound at ``delta`` of a non-empty history ``[(sigma, q, steps), ...]``.

    Returns ``inf`` when the discretisation grid would exceed
    :data:`MAX_PRV_DOMAIN_POINTS` or the PRV numerics fail or overflow (a vacuous but
    valid bound).
    Inputs are not validated here (:func:`fedtune.privacy.accountant.compute_epsilon`
    does it).
    """
    from opacus.accountants import PRVAccountant

    history = list(history)
    delta_error = delta / 1000  # Opacus' default for PRVAccountant.get_epsilon
    half_width = _half_width(history, delta_error, relation)
    if 2 * half_width / _mesh(history, delta_error) > MAX_PRV_DOMAIN_POINTS:
        return math.inf
    try:
        if relation == "replace-one":
            eps = _replace_one_epsilon(
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
