"""The ε-from-guesses conversion of one-run auditing (fedtune.privacy.empirical).

Expected numbers are worked out from the theorems of Steinke, Nasr & Jagielski,
"Privacy Auditing with One (1) Training Run" (NeurIPS 2023): Theorem 3.1 (pure DP,
``P[V >= v] <= P[Binomial(r, q) >= v]``, ``q = e^ε / (1 + e^ε)``) and Theorem 5.2
(approximate DP, the extra ``2 m δ α`` term), by hand or with ``math.comb`` one term at
a time, never with the module's own code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.privacy.empirical import audit_scores, epsilon_lower_bound, p_value


def _binom_pmf(k: int, n: int, q: float) -> float:
    return math.comb(n, k) * q**k * (1 - q) ** (n - k)


def _theorem_5_2(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2 term by term: β = P[B >= v]; α = max_i P[v - i <= B < v] / i."""
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = sum(_binom_pmf(k, r, q) for k in range(v, r + 1))
    alpha = max(
        (sum(_binom_pmf(k, r, q) for k in range(v - i, v)) / i for i in range(1, v + 1)),
        default=0.0,
    )
    return min(beta + 2 * m * delta * alpha, 1.0)


def test_ten_right_guesses_of_a_fair_coin() -> None:
    # ε = 0: every guess is right with probability 1/2, so 10 of 10 has p = 2^-10.
    assert p_value(canaries=10, guesses=10, correct=10, epsilon=0.0, delta=0.0) == pytest.approx(
        2.0**-10
    )


def test_two_guesses_by_hand() -> None:
    # ε = ln 3: q = 3/4. β = q² = 0.5625; P[B = 1] = 2q(1-q) = 0.375 (i = 1),
    # (P[B = 1] + P[B = 0]) / 2 = (0.375 + 0.0625) / 2 = 0.21875 (i = 2): α = 0.375.
    # With m = 2, δ = 0.01: p = 0.5625 + 2 * 2 * 0.01 * 0.375 = 0.5775.
    got = p_value(canaries=2, guesses=2, correct=2, epsilon=math.log(3), delta=0.01)
    assert got == pytest.approx(0.5775, abs=1e-12)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(1000, 200, 180, 2.0, 1e-5), (500, 100, 60, 0.5, 1e-3), (50, 50, 50, 4.0, 1e-2)],
)
def test_p_value_is_theorem_5_2(m: int, r: int, v: int, eps: float, delta: float) -> None:
    got = p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)
    assert got == pytest.approx(_theorem_5_2(m, r, v, eps, delta), rel=1e-9, abs=1e-300)


def test_all_guesses_right_under_pure_dp_has_a_closed_form() -> None:
    # δ = 0, v = r: P[V >= r] = q^r, so the bound at 95% solves q^r = 0.05:
    # q = 0.05^(1/r), ε = ln(q / (1 - q)). r = 100: q = 0.970487, ε = 3.4929.
    q = 0.05 ** (1 / 100)
    expected = math.log(q / (1 - q))
    assert expected == pytest.approx(3.4929, abs=1e-4)
    got = epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=0.0)
    assert got == pytest.approx(expected, abs=1e-5)


def test_delta_only_lowers_the_bound() -> None:
    pure = epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=0.0)
    approx = epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=1e-5)
    assert 0 < approx < pure
    # at the bound the p-value is 1 - confidence (bisection to 1e-6)
    at = p_value(canaries=1000, guesses=100, correct=100, epsilon=approx, delta=1e-5)
    assert at == pytest.approx(0.05, rel=1e-3)


def test_chance_level_guessing_proves_nothing() -> None:
    assert epsilon_lower_bound(canaries=1000, guesses=200, correct=100, delta=1e-5) == 0.0
    assert epsilon_lower_bound(canaries=1000, guesses=0, correct=0, delta=1e-5) == 0.0


def test_more_correct_guesses_prove_more() -> None:
    bounds = [
        epsilon_lower_bound(canaries=500, guesses=100, correct=v, delta=1e-5)
        for v in (60, 70, 80, 90, 100)
    ]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]


def test_scores_to_guesses() -> None:
    rng = np.random.default_rng(0)
    coins = rng.random(500) < 0.5
    # perfect scores: every guess right
    perfect = audit_scores(coins.astype(float), coins, k_plus=50, k_minus=50, delta=1e-5)
    assert (perfect.guesses, perfect.correct) == (100, 100)
    assert perfect.epsilon_lower_bound == epsilon_lower_bound(
        canaries=500, guesses=100, correct=100, delta=1e-5
    )
    # scores that ignore the coins prove nothing, and the same scores give the same answer
    noise = rng.standard_normal(500)
    first = audit_scores(noise, coins, k_plus=50, k_minus=50, delta=1e-5)
    assert first == audit_scores(noise.copy(), coins.copy(), k_plus=50, k_minus=50, delta=1e-5)
    assert first.epsilon_lower_bound < 0.5
    assert first.to_json()["guesses"] == 100


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canaries": 10, "guesses": 11, "correct": 0}, "correct <= guesses <= canaries"),
        ({"canaries": 10, "guesses": 5, "correct": 6}, "correct <= guesses <= canaries"),
        ({"canaries": 10.0, "guesses": 5, "correct": 1}, "`canaries` must be an integer"),
    ],
)
def test_bad_counts_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        p_value(epsilon=1.0, delta=0.0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k_plus"):
        audit_scores([0.0, 1.0], [True, False], k_plus=2, k_minus=1, delta=0.0)
