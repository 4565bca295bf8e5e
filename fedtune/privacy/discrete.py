"""The discrete Gaussian on a grid: client-level noise shares with no floating-point noise.

Sampler: Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential Privacy",
NeurIPS 2020 (https://arxiv.org/abs/2004.00010), Algorithms 1--3, in exact integer and
rational arithmetic on uniform integers from a CSPRNG. ``N_Z(0, s^2)`` is the
distribution on the integers with ``P[Y = y] ∝ exp(-y^2 / (2 s^2))``.

A client-level release (:func:`discrete_noisy_update`) draws its ``d`` values at once
with the vectorised sampler (:mod:`fedtune.privacy.discrete_array`, same algorithm and
law, 20-40x faster) when ``rng`` is a :class:`KeystreamRandom`; it is

    q = g * (round(x / g) + K),    K ~ N_Z(0, s^2)^d,
    s = (1 + g sqrt(d) / (2C)) σ C / (g sqrt(m - t)),

for the clipped update ``x`` (``||x||_2 <= C``) and a grid step ``g`` that is a power of
two: ``x / g``, the rounding, the integer sum and ``* g`` are exact in float64 while
``|round(x / g) + K| < 2^53`` (checked), so no floating-point operation ever touches the
noise and Mironov-style attacks on the low bits (CCS 2012; Jin et al., S&P 2022) have
nothing to read. Rounding moves each coordinate by at most ``g / 2``, so replacing one
client's data moves the rounded sum by at most ``2C + g sqrt(d)`` (L2). The share's
scale ``s`` is raised by that same factor ``1 + g sqrt(d) / (2C)`` (at most ``1 + 2^-7``
with the grid of :func:`grid_step`: 0.8% more noise), so the honest shares' sum has noise
multiplier at least σ with respect to the rounded sensitivity, and the accounting of the
continuous shares (:func:`fedtune.privacy.client_level.compose_client_round` with σ) holds
unchanged.

Privacy: CKS prove that adding ``N_Z(0, s^2)^d`` to an integer vector of L2
sensitivity Δ gives ``ρ = Δ^2 / (2 s^2)`` zero-concentrated DP, i.e. Rényi DP
``α Δ^2 / (2 s^2)`` of every order α: no more than the continuous Gaussian of the same
``s``. A sum of ``n = m - t`` honest shares is not itself a discrete Gaussian; Kairouz,
Liu & Steinke (ICML 2021, https://arxiv.org/abs/2102.06387, Theorem 1) bound it:
``ε(α) <= α Δ^2 / (2 n s^2) + τ d``, ``τ = 10 Σ_{k=1}^{n-1} exp(-2 π^2 s^2 k / (k + 1))``.
For the ``s >= 8`` enforced here ``τ < 10 n e^(-π^2 64) < n 1e-273``: nothing at any
realistic ``n`` and ``d``. ``docs/float-noise.md`` says what this covers and what not.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

from fedtune.privacy._checks import check_positive, check_positive_int
from fedtune.privacy.client_level import share_std
from fedtune.privacy.discrete_array import discrete_gaussian_array, fits_vectorised
from fedtune.privacy.discrete_bits import (
    KeystreamRandom,
    bernoulli_exp,
    discrete_gaussian,
    discrete_laplace,
)
from fedtune.privacy.noise import CsprngNoise

__all__ = [
    "DiscreteRelease",
    "KeystreamRandom",
    "bernoulli_exp",
    "discrete_gaussian",
    "discrete_laplace",
    "discrete_noisy_update",
    "grid_step",
    "round_up_variance",
]

#: Integers with |v| < 2^53 are exact in float64; the released integers must stay below.
_EXACT = 1 << 53
#: Rounding to the grid costs at most a factor ``1 + 2^-SLACK_BITS`` in noise.
SLACK_BITS = 7
#: The smallest per-share integer scale accepted (``τ`` negligible, the grid fine).
MIN_SCALE = 8
#: ``s^2`` is rounded *up*, relatively by at most ``2^-_SIGMA_BITS``: short rationals.
_SIGMA_BITS = 24


def round_up_variance(scale2: Fraction) -> Fraction:
    """``s^2`` rounded up to a multiple of ``2^-k``, ``k = min(24, max(0, 24 - floor(log2
    s^2)))``: relatively at most ``2^-24`` above (absolutely ``2^-24`` below ``s^2 = 1``),
    never below, and with a denominator small enough for the vectorised sampler
    (:mod:`fedtune.privacy.discrete_array`: ``2 a b t^2 < 2^62`` up to ``s`` of about
    38,000)."""
    if scale2 <= 0:
        raise ValueError(f"`scale2` must be > 0, got {scale2}.")
    bits = min(_SIGMA_BITS, max(0, _SIGMA_BITS - math.floor(math.log2(float(scale2)))))
    return Fraction(math.ceil(scale2 * (1 << bits)), 1 << bits)


def grid_step(*, clip_norm: float, dim: int) -> float:
    """The largest power of two ``g`` with ``g sqrt(dim) <= 2 C 2^-SLACK_BITS``.

    Rounding to this grid raises the replace-one sensitivity ``2C`` by at most the
    factor ``1 + 2^-SLACK_BITS`` (``g sqrt(d) / (2C)``), about 0.8% more noise.
    """
    clip = check_positive("clip_norm", clip_norm)
    dim = check_positive_int("dim", dim)
    bound = 2.0 * clip * 2.0**-SLACK_BITS / math.sqrt(dim)
    return 2.0 ** math.floor(math.log2(bound))


@dataclass(frozen=True)
class DiscreteRelease:
    """What :func:`discrete_noisy_update` returns."""

    #: ``g * (round(x / g) + K)``: clipped update plus this client's share, exact floats.
    values: NDArray[np.float64]
    #: The grid step ``g`` (a power of two).
    grid: float
    #: ``s^2`` of each integer share, as used (``σ C / (g sqrt(m - t))`` squared, rounded up).
    share_variance: Fraction
    #: The honest sum's noise over the rounded sensitivity ``2C + g sqrt(d)``: >= σ.
    effective_noise_multiplier: float


def discrete_noisy_update(
    clipped: NDArray[np.float64],
    *,
    noise_multiplier: float,
    clip_norm: float,
    num_sampled_clients: int,
    tolerance: int,
    rng: random.Random | None = None,
) -> DiscreteRelease:
    """The clipped update plus this client's discrete Gaussian share, on an exact grid.

    Parameters
    ----------
    clipped
        The update after :func:`fedtune.privacy.client_level.clip_update` (L2 <= C).
    noise_multiplier, clip_norm, num_sampled_clients, tolerance
        σ, C, m and t as for :func:`fedtune.privacy.client_level.share_std`.
    rng
        Uniform integers; default a :class:`KeystreamRandom` over a fresh
        :class:`~fedtune.privacy.noise.CsprngNoise` (the OS CSPRNG's key); pass
        ``KeystreamRandom(noise)`` to use the release's own noise source.

    Raises
    ------
    ValueError
        If ``clipped`` is not finite or longer than C (clip first), or the grid would
        need integers beyond 2^53 (a ``clip_norm`` far from the update's scale).
    """
    std = share_std(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        num_sampled_clients=num_sampled_clients,
        tolerance=tolerance,
    )
    x = np.asarray(clipped, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("`clipped` contains NaN or inf entries; clip a finite update.")
    if float(np.linalg.norm(x)) > clip_norm * (1.0 + 1e-9):
        raise ValueError(
            f"`clipped` has L2 norm {float(np.linalg.norm(x)):.6g} > `clip_norm` = "
            f"{clip_norm}; pass the output of clip_update."
        )
    grid = grid_step(clip_norm=clip_norm, dim=max(1, x.size))
    inflation = 1.0 + grid * math.sqrt(x.size) / (2.0 * clip_norm)
    scale = inflation * std / grid
    if scale < MIN_SCALE:
        raise ValueError(
            f"the share's scale is {scale:.3g} grid steps (< {MIN_SCALE}); raise "
            "`noise-multiplier` or lower `client-dp-tolerance`."
        )
    sigma2 = round_up_variance(Fraction(scale) ** 2)  # never less noise than planned
    source = rng if rng is not None else KeystreamRandom(CsprngNoise())
    ints = np.rint(x / grid).astype(np.int64)  # exact: g is a power of two
    noise = _share(sigma2, x.size, source)
    total = ints + noise
    if x.size and int(np.abs(total).max()) >= _EXACT:
        raise ValueError(
            f"the released integers reach {int(np.abs(total).max())} >= 2^53 at grid step "
            f"{grid}; float64 cannot hold them exactly (lower `max-grad-norm`)."
        )
    values = total.astype(np.float64) * grid  # exact: integers < 2^53 times 2^k
    # s^2 was rounded up, so (m - t) s^2 g^2 >= (σ C inflation)^2: σ_eff >= σ.
    honest = math.sqrt(float(sigma2) * (num_sampled_clients - tolerance)) * grid
    sensitivity = 2.0 * clip_norm + grid * math.sqrt(x.size)
    return DiscreteRelease(
        values=values.reshape(np.shape(clipped)),
        grid=grid,
        share_variance=sigma2,
        effective_noise_multiplier=honest * 2.0 / sensitivity,
    )


def _share(sigma2: Fraction, n: int, rng: random.Random) -> NDArray[np.int64]:
    """``n`` draws of ``N_Z(0, sigma2)``: vectorised from a keystream where its integer
    bounds allow (:mod:`fedtune.privacy.discrete_array`), else the scalar sampler."""
    if isinstance(rng, KeystreamRandom) and fits_vectorised(sigma2):
        return discrete_gaussian_array(sigma2, n, rng)
    return np.fromiter((discrete_gaussian(sigma2, rng) for _ in range(n)), dtype=np.int64, count=n)
