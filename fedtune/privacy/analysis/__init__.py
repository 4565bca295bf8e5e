"""Pure maths of the Poisson-subsampled Gaussian under the *replace-one* relation.

fedtune publishes each client's example count ``n_k`` (it is the FedAvg weight and sets
the sampling rate ``q = B / n_k`` and the number of steps), so the neighbouring data
sets a DP client is protected against have the **same size**: one example replaced by
another (bounded DP, "replace-one"). Opacus' accountants analyse add/remove-one, which
would need ``n_k`` to stay secret. This package gives the two replace-one analyses the
accountant (:mod:`fedtune.privacy.accountant`) uses, and the ε of a composition history
under either relation; nothing here holds state.

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
variable has a closed form (:class:`ReplaceOneGaussianPRV`, in :mod:`.prv`), which
Opacus' numerical composition (Gopi, Lee & Wutschitz, NeurIPS 2021) then composes.

For RDP (:mod:`.rdp`), the weak triangle inequality of Rényi divergence through
``N(0, σ²)`` bounds the replace-one divergence by two add/remove ones, which Opacus
computes exactly: a looser upper bound, the cross-check of the PRV figure.

Both rest on the Gaussian density. For the *discrete* Gaussian of grid DP-SGD,
:mod:`.discrete_rdp` proves a looser bound that holds for any mechanism with the
Gaussian's Rényi curve (Zhu & Wang 2019's general subsampling theorem).
"""

from fedtune.privacy.analysis.discrete_rdp import discrete_rdp_epsilon
from fedtune.privacy.analysis.prv import (
    MAX_PRV_DOMAIN_POINTS,
    PRV_EPS_ERROR,
    ReplaceOneGaussianPRV,
    prv_epsilon,
)
from fedtune.privacy.analysis.rdp import (
    RELATIONS,
    REPLACE_ONE_RDP_ORDERS,
    Relation,
    rdp_epsilon,
    replace_one_rdp,
)

__all__ = [
    "MAX_PRV_DOMAIN_POINTS",
    "PRV_EPS_ERROR",
    "RELATIONS",
    "REPLACE_ONE_RDP_ORDERS",
    "Relation",
    "ReplaceOneGaussianPRV",
    "discrete_rdp_epsilon",
    "prv_epsilon",
    "rdp_epsilon",
    "replace_one_rdp",
]
