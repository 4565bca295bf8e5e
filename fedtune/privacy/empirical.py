"""Empirical lower bounds on ε from one run: the maths of one-run privacy auditing.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
2023, https://arxiv.org/abs/2305.08846). ``m`` canaries each get an independent fair
coin: heads, the canary takes part in training; tails, it does not (under the
replace-one relation its slot then holds a placeholder that contributes nothing, so
the data set's size is the same either way). After the run the auditor scores every
canary from what was released, guesses "in" for the ``k_plus`` highest scores and
"out" for the ``k_minus`` lowest, abstains on the rest, and counts ``v`` correct of
``r = k_plus + k_minus`` guesses.

If the whole run is (ε, δ)-DP with respect to one canary's coin, Theorem 5.2 of the
paper bounds how often that many guesses can be right::

    P[V >= v] <= β + 2 m δ α,
    β = P[Binomial(r, q) >= v],                 q = e^ε / (1 + e^ε),
    α = max_{i = 1..v} P[v - i <= Binomial(r, q) < v] / i

(:func:`p_value`; with δ = 0 it is Theorem 3.1, ``β`` alone). An observed ``v``
whose p-value is below ``1 - confidence`` rejects "the run is (ε, δ)-DP", so the
largest such ε (:func:`epsilon_lower_bound`, by bisection: the p-value grows with ε)
is a lower bound on the run's true ε at that confidence. The number of guesses must
be fixed before the scores are seen (choosing it afterwards is a multiple test);
:func:`audit_scores` takes ``k_plus`` / ``k_minus`` as arguments for that reason.

This module is pure maths on counts and scores (numpy and scipy only); how canaries
enter training and how they are scored lives with the training code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

__all__ = ["EmpiricalBound", "audit_scores", "epsilon_lower_bound", "p_value"]

#: Upper end of the ε bisection: ``q = e^50 / (1 + e^50)`` is 1 to double precision.
_EPSILON_CAP = 50.0


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    for name, value in (("canaries", canaries), ("guesses", guesses), ("correct", correct)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            "need 0 <= correct <= guesses <= canaries, got "
            f"correct={correct}, guesses={guesses}, canaries={canaries}."
        )


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least ``correct`` of ``guesses`` right] if the run is (ε, δ)-DP (Theorem 5.2).

    >>> round(p_value(canaries=10, guesses=10, correct=10, epsilon=0.0, delta=0.0), 6)
    0.000977
    """
    _check_counts(canaries, guesses, correct)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"`epsilon` must be finite and >= 0, got {epsilon!r}.")
    if not 0 <= delta <= 1:
        raise ValueError(f"`delta` must be in [0, 1], got {delta!r}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    beta = float(binom.sf(correct - 1, guesses, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    # P[v - i <= B < v] for i = 1..v, as a running sum of the pmf below v
    below = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(beta + 2.0 * canaries * delta * alpha, 1.0)


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ε that ``correct`` right guesses reject at ``confidence`` (0 if none).

    Bisection to 1e-6 on ε: the p-value of :func:`p_value` increases with ε.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
    threshold = 1.0 - confidence

    def rejected(eps: float) -> bool:
        value = p_value(
            canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta
        )
        return value < threshold

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, _EPSILON_CAP
    if rejected(high):
        return high
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


@dataclass(frozen=True)
class EmpiricalBound:
    """One audit: the guesses made, how many were right, and the ε they prove."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int

    def to_json(self) -> dict[str, float | int]:
        """The ``empirical`` object of ``fedtune audit --json`` (without the claimed ε)."""
        return {
            "epsilon-lower-bound": self.epsilon_lower_bound,
            "confidence": self.confidence,
            "delta": self.delta,
            "canaries": self.canaries,
            "guesses": self.guesses,
            "correct": self.correct,
        }


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    k_plus: int,
    k_minus: int,
    delta: float,
    confidence: float = 0.95,
) -> EmpiricalBound:
    """Guess "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest.

    Ties are broken by canary index (stable sort), so the result depends only on the
    scores and coins. ``k_plus`` and ``k_minus`` must be chosen before the scores are
    seen.
    """
    s = np.asarray(scores, dtype=np.float64)
    coins = np.asarray(included, dtype=bool)
    m = len(s)
    if coins.shape != s.shape or s.ndim != 1:
        raise ValueError(
            f"`scores` and `included` must be two 1-d arrays of one length, "
            f"got shapes {s.shape} and {coins.shape}."
        )
    if not np.isfinite(s).all():
        raise ValueError("`scores` must be finite.")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(
            f"need k_plus, k_minus >= 0 and k_plus + k_minus <= {m} canaries, "
            f"got k_plus={k_plus}, k_minus={k_minus}."
        )
    order = np.argsort(-s, kind="stable")  # highest first
    guessed_in = order[:k_plus]
    guessed_out = order[m - k_minus :] if k_minus else order[:0]
    correct = int(coins[guessed_in].sum() + (~coins[guessed_out]).sum())
    guesses = k_plus + k_minus
    return EmpiricalBound(
        epsilon_lower_bound=epsilon_lower_bound(
            canaries=m, guesses=guesses, correct=correct, delta=delta, confidence=confidence
        ),
        confidence=confidence,
        delta=delta,
        canaries=m,
        guesses=guesses,
        correct=correct,
    )
