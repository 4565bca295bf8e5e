"""Pure maths of the Poisson-subsampled Gaussian under the *replace-one* relation.

fedtune publishes each client's example count ``n_k`` (it is the FedAvg weight and sets
the sampling rate ``q = B / n_k`` and the number of steps), so the neighbouring data
sets a DP client is protected against have the **same size**: one example replaced by
another (bounded DP, "replace-one"). Opacus' accountants analyse add/remove-one, which
would need ``n_k`` to stay secret. This module gives the two replace-one analyses the
accountants use; nothing here holds state.

One step releases ``sum_{i in batch} clip(g_i) + N(0, σ² C² I)`` where each example is
in the batch independently with probability ``q``. Replacing example ``x`` by ``x'``
(same coin) moves the sum by ``b (clip(g_x') - clip(g_x))`` with ``b ~ Bernoulli(q)``;
the worst case is ``clip(g_x) = -C e`` and ``clip(g_x') = +C e``. In units of ``C``
the tight dominating pair is one-dimensional (Zhu, Dong & Wang, "Optimal Accounting of
Differential Privacy via Characteristic Function", AISTATS 2022,
https://arxiv.org/abs/2106.08567; the same pair as Google's ``dp_accounting`` PLD with
``NeighboringRelation.REPLACE_ONE``)::

    P = (1 - q) N(0, σ²) + q N(-1, σ²)      Q = (1 - q) N(0, σ²) + q N(+1, σ²)

Its privacy loss ``L(x) = ln P(x)/Q(x)`` is decreasing in ``x`` and, with
``u = exp(x / σ²)`` and ``a = exp(-1 / (2σ²))``,
``L = ln[((1-q) + q a / u) / ((1-q) + q a u)]``, so ``L(x) = t`` is the quadratic
``e^t q a u² + (1-q)(e^t - 1) u - q a = 0`` in ``u``: the CDF of the privacy loss random
variable has a closed form (:class:`ReplaceOneGaussianPRV`), which Opacus' numerical
composition (Gopi, Lee & Wutschitz, NeurIPS 2021) then composes.

For RDP, ``P/Q = (P/N₀)(N₀/Q)`` with ``N₀ = N(0, σ²)``, and the weak triangle inequality
of Rényi divergence (Mironov, "Rényi Differential Privacy", CSF 2017, Proposition 11,
with ``p = 2``) gives

    D_α(P ‖ Q) <= (α - 1/2)/(α - 1) · D_{2α}(P ‖ N₀) + D_{2α-1}(N₀ ‖ Q),

and both right-hand terms are at most the add/remove RDP ``R(β)`` of the sampled
Gaussian (Mironov, Talwar & Zhang 2019), which Opacus computes exactly for integer
orders. Orders ``α = k/2`` keep ``2α`` and ``2α - 1`` integers. The bound is loose (it
is the cross-check, PRV is the tight figure) but it is an upper bound.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.typing import NDArray
from scipy.special import erfc

__all__ = [
    "REPLACE_ONE_RDP_ORDERS",
    "ReplaceOneGaussianPRV",
    "replace_one_rdp",
]

_SQRT2 = math.sqrt(2.0)

REPLACE_ONE_RDP_ORDERS: tuple[float, ...] = tuple(k / 2 for k in range(3, 129)) + tuple(
    float(a) for a in (80, 96, 128, 160, 192, 256)
)
"""RDP orders α of :func:`replace_one_rdp` (``2α`` and ``2α - 1`` are integers)."""


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


def replace_one_rdp(
    sample_rate: float, noise_multiplier: float, steps: int, orders: list[float] | tuple[float, ...]
) -> NDArray[np.float64]:
    """RDP upper bounds of ``steps`` replace-one steps at each order (module docstring).

    Every order must be a multiple of 1/2 and at least 1.5.
    """
    for alpha in orders:
        if alpha < 1.5 or not float(2 * alpha).is_integer():
            raise ValueError(f"replace-one RDP orders must be k/2 with k >= 3, got {alpha!r}.")
    per_step = _add_remove_rdp(float(sample_rate), float(noise_multiplier))
    out = [
        (alpha - 0.5) / (alpha - 1) * per_step[int(2 * alpha)] + per_step[int(2 * alpha) - 1]
        for alpha in orders
    ]
    return steps * np.asarray(out, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def _add_remove_rdp(sample_rate: float, noise_multiplier: float) -> dict[int, float]:
    """Opacus' exact add/remove RDP of one step at every integer order the grid needs."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    needed = sorted(
        {int(2 * a) for a in REPLACE_ONE_RDP_ORDERS}
        | {int(2 * a) - 1 for a in REPLACE_ONE_RDP_ORDERS}
    )
    values = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=needed
    )
    return dict(zip(needed, (float(v) for v in values), strict=True))
