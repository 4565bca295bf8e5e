"""Rényi DP of the Poisson-subsampled Gaussian under either neighbouring relation.

Add/remove-one is Opacus' exact analysis of the sampled Gaussian (Mironov, Talwar &
Zhang 2019, https://arxiv.org/abs/1908.10530). Replace-one (see
:mod:`fedtune.privacy.analysis`) is bounded through it: with ``N₀ = N(0, σ²)``,
``P/Q = (P/N₀)(N₀/Q)``, and the weak triangle inequality of Rényi divergence (Mironov,
"Rényi Differential Privacy", CSF 2017, Proposition 11, with ``p = 2``) gives

    D_α(P ‖ Q) <= (α - 1/2)/(α - 1) · D_{2α}(P ‖ N₀) + D_{2α-1}(N₀ ‖ Q),

and both right-hand terms are at most the add/remove RDP ``R(β)`` of the sampled
Gaussian, which Opacus computes exactly for integer orders. Orders ``α = k/2`` keep
``2α`` and ``2α - 1`` integers. The bound is loose (it is the cross-check, PRV is the
tight figure) but it is an upper bound.

Pure functions; Opacus is imported inside them (importing it calls
``logging.basicConfig``, which a library must not do at import time).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "RELATIONS",
    "REPLACE_ONE_RDP_ORDERS",
    "Relation",
    "rdp_epsilon",
    "replace_one_rdp",
]

Relation = Literal["replace-one", "add-remove"]
RELATIONS: tuple[str, ...] = ("replace-one", "add-remove")
"""Neighbouring relations: ``replace-one`` (same size, one example swapped; what fedtune
runs, since ``n_k`` is public) and ``add-remove`` (Opacus' own analysis)."""

REPLACE_ONE_RDP_ORDERS: tuple[float, ...] = tuple(k / 2 for k in range(3, 129)) + tuple(
    float(a) for a in (80, 96, 128, 160, 192, 256)
)
"""RDP orders α of :func:`replace_one_rdp` (``2α`` and ``2α - 1`` are integers)."""

_GUARD_ORDERS = [float(a) for a in range(2, 65)] + [80.0, 96.0, 128.0, 192.0, 256.0]
_GUARD_SMALL_ORDERS = [1.1, 1.25, 1.5, 1.75]


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


def rdp_epsilon(
    history: Sequence[tuple[float, float, int]], *, delta: float, relation: Relation, coarse: bool
) -> float:
    """ε at ``delta`` of the summed RDP curve of ``history`` under ``relation``.

    ``history`` is Opacus-style, ``[(sigma, q, steps), ...]``. ``coarse`` (add-remove
    only) uses integer orders, which have a closed form: the PRV domain-size guard
    (:mod:`fedtune.privacy.analysis.prv`) needs an upper bound fast, and fewer orders
    only loosen it.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

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
