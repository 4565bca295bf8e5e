"""A proven Rényi DP bound for the Poisson-subsampled *discrete* Gaussian.

The accountants in :mod:`.prv` and :mod:`.rdp` analyse the Poisson-subsampled
*continuous* Gaussian; their closed forms (Mironov, Talwar & Zhang 2019; the replace-one
PRV) use the Gaussian density itself and are not proven for the discrete Gaussian that
fedtune's grid DP-SGD releases (:mod:`fedtune.privacy.optimizer`). This module proves an
upper bound from facts that hold for *any* mechanism with the Gaussian's RDP curve, so
it covers both:

1. **The base mechanism.** One step without subsampling releases
   ``sum_{i in S} k_i + K``, ``K ~ N_Z(0, s²)^d``, with integer rows ``||k_i|| <= R``
   and ``s >= σ R``. Canonne, Kamath & Steinke (NeurIPS 2020,
   https://arxiv.org/abs/2004.00010, Theorem 14): the multivariate discrete Gaussian on
   an integer query of L2 sensitivity Δ is ``Δ²/(2s²)``-zCDP, i.e. Rényi DP
   ``ε(α) <= α Δ² / (2 s²)`` at every order ``α > 1`` -- the continuous Gaussian's curve.
   Adding or removing one example moves the query by ``||k_i|| <= R``:
   ``ε(α) <= α c`` with ``c = 1 / (2σ²)``.
2. **Poisson subsampling, add/remove, any mechanism.** Zhu & Wang, "Poisson Subsampled
   Rényi Differential Privacy", ICML 2019 (PMLR 97:7634-7642), Theorem 6 (general upper
   bound): for any mechanism with RDP ``ε(·)`` and sampling rate ``γ``, at every integer
   ``α >= 2`` the subsampled mechanism has RDP at most ::

       1/(α-1) · log[ (1-γ)^(α-1) (αγ - γ + 1)
                      + C(α,2) γ² (1-γ)^(α-2) e^{ε(2)}
                      + 3 Σ_{ℓ=3..α} C(α,ℓ) (1-γ)^(α-ℓ) γ^ℓ e^{(ℓ-1) ε(ℓ)} ],

   for the add/remove relation (RDP there is a supremum over ordered pairs of
   neighbours, so both directions). It is the exact Gaussian formula with the terms
   ``ℓ >= 3`` tripled (the abstract's "optimal up to an additive log(3)/(α-1)").
   The subsampled mechanism is also never worse than the base one (joint convexity of
   ``exp((α-1) D_α)`` over the coupled subsets), so the bound used is the smaller of
   the two: :func:`add_remove_rdp`.
3. **Replace-one** (what fedtune runs: ``n_k`` is public). With ``A`` the output law on
   the data set without the replaced example, ``P = (1-γ)A + γB`` and
   ``Q = (1-γ)A + γB'`` are each an add/remove neighbour of ``A``; the weak triangle
   inequality of Rényi divergence (Mironov, "Rényi Differential Privacy", CSF 2017,
   Proposition 11, ``p = 2``) gives ::

       D_α(P ‖ Q) <= (α - 1/2)/(α - 1) · D_{2α}(P ‖ A) + D_{2α-1}(A ‖ Q),

   and both terms are add/remove divergences bounded by step 2 at the integer orders
   ``2α`` and ``2α - 1`` (so ``α = k/2``). Also never worse than the base mechanism of
   replace-one sensitivity ``2R``: ``4αc``. :func:`replace_one_rdp_general`.
4. **Composition** adds RDP curves (Mironov 2017, Proposition 1) and the conversion to
   (ε, δ) is the improved one of Balle, Barthe, Gaboardi, Hsu & Sato (AISTATS 2020,
   https://arxiv.org/abs/1905.09982, Theorem 21), the one Opacus' RDP accountant uses::

       ε = min_α  RDP(α) + log((α-1)/α) - (log δ + log α)/(α - 1).

Because step 2 holds for any mechanism whose RDP is at most ``α c``, the bound also
covers the continuous Gaussian (and the float evaluation releases, ``q = 1``), so one
history mixing both mechanisms is bounded by one curve. Everything is in log space
(``scipy.special.gammaln``, ``logsumexp``), stable to ``α = 512``. Pure functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.special import gammaln, logsumexp

from fedtune.privacy.analysis.rdp import REPLACE_ONE_RDP_ORDERS, Relation

__all__ = [
    "ADD_REMOVE_ORDERS",
    "add_remove_rdp",
    "discrete_rdp_epsilon",
    "rdp_to_epsilon",
    "replace_one_rdp_general",
]

ADD_REMOVE_ORDERS: tuple[float, ...] = tuple(float(a) for a in range(2, 257))
"""Integer orders of the add/remove curve (Zhu & Wang's theorem needs integers)."""


def _log_moment(order: int, q: float, c: float, *, factor: float) -> float:
    """``log`` of the bracket of Zhu & Wang's Theorem 6 at integer ``order`` >= 2.

    ``factor = 3`` is their general bound (both directions); ``factor = 1`` is the exact
    binomial expansion of the remove direction (module docstring, step 2).
    """
    a = order
    log_q, log_1q = math.log(q), math.log1p(-q)
    ell = np.arange(2, a + 1, dtype=np.float64)
    log_binom = gammaln(a + 1.0) - gammaln(ell + 1.0) - gammaln(a - ell + 1.0)
    # e^{(ℓ-1) ε(ℓ)} with ε(ℓ) = ℓ c; ℓ = 2 keeps e^{ε(2)} = e^{2c}, ℓ >= 3 are tripled.
    terms = log_binom + ell * log_q + (a - ell) * log_1q + (ell - 1.0) * ell * c
    terms[1:] += math.log(factor)
    first = (a - 1) * log_1q + math.log1p((a - 1) * q)
    return float(logsumexp(np.concatenate(([first], terms))))


@functools.lru_cache(maxsize=512)
def _add_remove_curve(q: float, sigma: float, factor: float = 3.0) -> dict[int, float]:
    """One step's add/remove RDP bound at every integer order 2..512 (``factor``: see
    :func:`_log_moment`)."""
    c = 1.0 / (2.0 * sigma * sigma)
    out: dict[int, float] = {}
    for a in range(2, 513):
        base = a * c
        if q >= 1.0:
            out[a] = base
            continue
        out[a] = min(base, _log_moment(a, q, c, factor=factor) / (a - 1))
    return out


def add_remove_rdp(
    sample_rate: float, noise_multiplier: float, steps: int, orders: Sequence[float]
) -> NDArray[np.float64]:
    """RDP upper bound of ``steps`` add/remove steps at integer ``orders`` in [2, 512].

    Any mechanism whose unsubsampled RDP is at most ``α / (2σ²)`` (module docstring,
    steps 1-2); ``sample_rate = 1`` gives exactly ``α / (2σ²)`` per step.
    """
    curve = _add_remove_curve(float(sample_rate), float(noise_multiplier))
    out = []
    for alpha in orders:
        if not float(alpha).is_integer() or not 2 <= alpha <= 512:
            raise ValueError(f"add/remove orders must be integers in [2, 512], got {alpha!r}.")
        out.append(curve[int(alpha)])
    return steps * np.asarray(out, dtype=np.float64)


def replace_one_rdp_general(
    sample_rate: float, noise_multiplier: float, steps: int, orders: Sequence[float]
) -> NDArray[np.float64]:
    """RDP upper bound of ``steps`` replace-one steps at orders ``k/2`` in [1.5, 256].

    Module docstring, step 3; ``sample_rate = 1`` gives exactly ``4α / (2σ²)`` per step
    (the base mechanism of replace-one sensitivity ``2R``).
    """
    both = _add_remove_curve(float(sample_rate), float(noise_multiplier))
    remove = _add_remove_curve(float(sample_rate), float(noise_multiplier), 1.0)
    c = 1.0 / (2.0 * float(noise_multiplier) ** 2)
    out = []
    for alpha in orders:
        if alpha < 1.5 or alpha > 256 or not float(2 * alpha).is_integer():
            raise ValueError(f"replace-one orders must be k/2 in [1.5, 256], got {alpha!r}.")
        base = 4.0 * alpha * c
        if sample_rate >= 1.0:
            out.append(base)
            continue
        two = int(2 * alpha)
        triangle = (alpha - 0.5) / (alpha - 1.0) * remove[two] + both[two - 1]
        out.append(min(base, triangle))
    return steps * np.asarray(out, dtype=np.float64)


def rdp_to_epsilon(orders: Sequence[float], rdp: NDArray[np.float64], *, delta: float) -> float:
    """ε at ``delta`` of an RDP curve (module docstring, step 4), never negative."""
    alphas = np.asarray(orders, dtype=np.float64)
    curve = np.asarray(rdp, dtype=np.float64)
    eps = curve + np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
    eps = eps[np.isfinite(eps)]
    if eps.size == 0:
        return math.inf
    return max(0.0, float(eps.min()))


def discrete_rdp_epsilon(
    history: Sequence[tuple[float, float, int]], *, delta: float, relation: Relation
) -> float:
    """ε at ``delta`` of ``[(σ, q, steps), ...]`` under ``relation``, proven for the
    Poisson-subsampled discrete Gaussian (and the continuous one); module docstring."""
    if not history:
        return 0.0
    if relation == "replace-one":
        orders: Sequence[float] = REPLACE_ONE_RDP_ORDERS
        curve = sum(replace_one_rdp_general(q, s, n, orders) for s, q, n in history)
    else:
        orders = ADD_REMOVE_ORDERS
        curve = sum(add_remove_rdp(q, s, n, orders) for s, q, n in history)
    return rdp_to_epsilon(orders, np.asarray(curve), delta=delta)
