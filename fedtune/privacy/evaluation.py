"""Held-out metrics as a Gaussian release: bounded per-example values, sums, noise.

A node's held-out metrics are means over its ``n`` held-out examples. Each metric
``m`` gets a per-example range ``[low_m, high_m]`` (:data:`EXAMPLE_BOUNDS`); every
example's value is clipped into it and rescaled to ``[0, 1]``::

    u_m(x) = (clip(v_m(x), low_m, high_m) - low_m) / (high_m - low_m)

The release is the vector of sums ``S_m = sum_x u_m(x)`` plus independent
``N(0, (σ Δ)^2)`` noise on each coordinate, with ``Δ = sqrt(k)`` for ``k`` metrics.
Under the replace-one relation (``n`` is public: it is a function of the node's data
size and its own ``test-fraction``), replacing one held-out example moves each
``S_m`` by at most 1, so the vector by at most ``Δ`` in L2: this is the Gaussian
mechanism (Dwork & Roth 2014, Appendix A; its RDP is ``α Δ² / (2 (σΔ)²) = α / (2σ²)``,
Mironov 2017, https://arxiv.org/abs/1702.07476), and for the accountants one entry
``(noise multiplier σ, sample rate 1, 1 step)``, composed with the training rounds
of the same ledger (:func:`fedtune.privacy.ledger.history_of`).

The node publishes ``low_m + (high_m - low_m) · clamp(S̃_m / n, 0, 1)``: clamping is
post-processing. Its error bar, before clamping, is ``(high_m - low_m) σ Δ / n``
(:func:`metric_std`).

The same held-out split is evaluated every round, so a DP evaluation also spends the
held-out examples' budget, which the ledger counts with everything else on the data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedtune.privacy._checks import check_positive
from fedtune.privacy.noise import NoiseSource

__all__ = [
    "EXAMPLE_BOUNDS",
    "EvalRelease",
    "clipped_sums",
    "metric_std",
    "release_metrics",
    "sensitivity",
]

#: Per-example ranges ``(low, high)`` of the built-in held-out metrics. Losses are
#: cross-entropies in nats: ``10`` is far above a classifier's ``log(num-labels)``
#: start and an LM's typical answer loss, so clipping only ever bites on outliers.
#: ``eval-reward-margin`` (preference) is a reward margin ``β (Δ log-prob)``.
EXAMPLE_BOUNDS: Mapping[str, tuple[float, float]] = {
    "eval-loss": (0.0, 10.0),
    "eval-accuracy": (0.0, 1.0),
    "eval-reward-margin": (-10.0, 10.0),
}


def sensitivity(num_metrics: int) -> float:
    """L2 sensitivity ``sqrt(k)`` of ``k`` rescaled sums under replace-one."""
    if isinstance(num_metrics, bool) or not isinstance(num_metrics, int) or num_metrics < 1:
        raise ValueError(f"`num_metrics` must be an integer >= 1, got {num_metrics!r}.")
    return math.sqrt(num_metrics)


def metric_std(
    *, noise_multiplier: float, num_examples: int, num_metrics: int, width: float
) -> float:
    """Std of one released mean: ``width · σ · sqrt(k) / n`` (before clamping)."""
    check_positive("noise_multiplier", noise_multiplier)
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples!r}.")
    return width * noise_multiplier * sensitivity(num_metrics) / num_examples


def _bounds(
    keys: list[str], bounds: Mapping[str, tuple[float, float]]
) -> list[tuple[float, float]]:
    out = []
    for key in keys:
        if key not in bounds:
            raise ValueError(
                f"held-out metric {key!r} has no per-example bound; a DP evaluation needs "
                f"one for every metric (known: {sorted(bounds)}). Add it to the bounds or "
                'set the node policy `evaluation = "exact"`.'
            )
        low, high = bounds[key]
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"bound of {key!r} must be finite with low < high, got {low, high}.")
        out.append((float(low), float(high)))
    return out


def clipped_sums(
    values: Mapping[str, NDArray[np.float64]],
    bounds: Mapping[str, tuple[float, float]] = EXAMPLE_BOUNDS,
) -> tuple[NDArray[np.float64], int]:
    """Sums of the rescaled, clipped per-example values (key order of ``values``), and ``n``.

    A NaN value (an example the model could not score) counts as the bound's low end.
    """
    keys = list(values)
    if not keys:
        raise ValueError("`values` must hold at least one metric.")
    lengths = {len(np.asarray(values[k]).reshape(-1)) for k in keys}
    if len(lengths) != 1:
        raise ValueError(f"every metric needs one value per example, got lengths {lengths}.")
    sums = np.zeros(len(keys), dtype=np.float64)
    for i, (key, (low, high)) in enumerate(zip(keys, _bounds(keys, bounds), strict=True)):
        v = np.asarray(values[key], dtype=np.float64).reshape(-1)
        v = np.nan_to_num(v, nan=low, posinf=high, neginf=low)
        sums[i] = float(((np.clip(v, low, high) - low) / (high - low)).sum())
    return sums, lengths.pop()


@dataclass(frozen=True)
class EvalRelease:
    """One DP release of held-out metrics.

    Attributes
    ----------
    metrics : dict[str, float]
        The published means (clamped into each metric's range).
    num_examples : int
        ``n``, public under replace-one.
    noise_multiplier : float
        σ: the noise std is ``σ · sensitivity`` on each rescaled sum.
    sensitivity : float
        Δ, the L2 sensitivity of the rescaled sums.
    """

    metrics: dict[str, float]
    num_examples: int
    noise_multiplier: float
    sensitivity: float


def release_metrics(
    values: Mapping[str, NDArray[np.float64]],
    *,
    noise_multiplier: float,
    noise: NoiseSource,
    bounds: Mapping[str, tuple[float, float]] = EXAMPLE_BOUNDS,
) -> EvalRelease:
    """The Gaussian release of ``values`` (per-example metrics), see the module docstring.

    Parameters
    ----------
    values
        metric key -> one value per held-out example.
    noise_multiplier
        σ, in units of the L2 sensitivity.
    noise
        Where the Gaussian comes from (:class:`fedtune.privacy.noise.CsprngNoise` on a
        node; :class:`~fedtune.privacy.noise.SeededNoise` in a seeded simulation).
    bounds
        Per-example ``(low, high)`` of each metric.
    """
    sigma = check_positive("noise_multiplier", noise_multiplier)
    sums, n = clipped_sums(values, bounds)
    if n < 1:
        raise ValueError("a DP evaluation needs at least one held-out example, got 0.")
    delta = sensitivity(len(sums))
    noisy = sums + noise.normal_numpy((len(sums),), sigma * delta)
    metrics = {}
    for key, total, (low, high) in zip(values, noisy, _bounds(list(values), bounds), strict=True):
        metrics[key] = low + (high - low) * min(1.0, max(0.0, float(total) / n))
    return EvalRelease(metrics=metrics, num_examples=n, noise_multiplier=sigma, sensitivity=delta)
