"""The discrete Gaussian (fedtune.privacy.discrete) against its exact pmf, and its grid."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

stats = pytest.importorskip("scipy.stats")

from fedtune.privacy.discrete import (  # noqa: E402
    SLACK_BITS,
    bernoulli_exp,
    discrete_gaussian,
    discrete_laplace,
    discrete_noisy_update,
    grid_step,
)


def _pmf(sigma2: float, support: range) -> np.ndarray:
    """``exp(-y^2 / (2 s^2))`` normalised over all integers (the tails beyond are < 1e-30)."""
    wide = np.arange(-2000, 2001)
    norm = np.exp(-(wide**2) / (2 * sigma2)).sum()
    return np.exp(-(np.array(support) ** 2) / (2 * sigma2)) / norm


def _chi2_pvalue(samples: list[int], sigma2: float, half_width: int) -> float:
    """Chi-square of the counts in [-w, w] (and both tails pooled) against the pmf."""
    support = range(-half_width, half_width + 1)
    p = _pmf(sigma2, support)
    counts = np.array([samples.count(y) for y in support], dtype=float)
    tail = len(samples) - counts.sum()
    observed = np.append(counts, tail)
    expected = np.append(p, max(0.0, 1.0 - p.sum())) * len(samples)
    keep = expected > 5
    observed = np.append(observed[keep], observed[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


@pytest.mark.parametrize("sigma2", [Fraction(9, 4), Fraction(7, 3), Fraction(30)])
def test_samples_follow_the_exact_pmf(sigma2: Fraction) -> None:
    rng = random.Random(1)
    samples = [discrete_gaussian(sigma2, rng) for _ in range(20_000)]
    width = 4 * math.isqrt(int(sigma2) + 1) + 4
    assert _chi2_pvalue(samples, float(sigma2), width) > 1e-3
    # the same test rejects a 10% wrong variance: it can fail
    assert _chi2_pvalue(samples, 1.1 * float(sigma2), width) < 1e-3


def test_a_large_scale_has_the_right_mean_and_variance() -> None:
    rng = random.Random(2)
    sigma2 = Fraction(10**6)
    z = np.array([discrete_gaussian(sigma2, rng) for _ in range(20_000)], dtype=float)
    n = len(z)
    assert abs(z.mean()) < 5 * 1000 / math.sqrt(n)
    assert abs(z.var() / 1e6 - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)


@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(1, 3), Fraction(1), Fraction(5, 2)])
def test_bernoulli_exp_has_probability_exp_minus_gamma(gamma: Fraction) -> None:
    rng = random.Random(3)
    n = 20_000
    hits = sum(bernoulli_exp(gamma, rng) for _ in range(n))
    assert stats.binomtest(hits, n, math.exp(-float(gamma))).pvalue > 1e-3
    with pytest.raises(ValueError, match="`gamma` must be >= 0, got -1"):
        bernoulli_exp(Fraction(-1), rng)


def test_discrete_laplace_has_the_exact_pmf() -> None:
    rng = random.Random(4)
    t = 3
    samples = [discrete_laplace(t, rng) for _ in range(20_000)]
    support = range(-12, 13)
    p = np.exp(-np.abs(np.array(support)) / t) * math.tanh(1 / (2 * t))  # (1-e^-1/t)/(1+e^-1/t)
    counts = np.array([samples.count(y) for y in support], dtype=float)
    observed = np.append(counts, len(samples) - counts.sum())
    expected = np.append(p, 1 - p.sum()) * len(samples)
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_the_release_is_exact_on_a_power_of_two_grid() -> None:
    """No floating-point operation touches the noise: every value is g times an integer."""
    d, clip = 3000, 1.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal(d)
    x *= 0.7 * clip / np.linalg.norm(x)
    out = discrete_noisy_update(
        x,
        noise_multiplier=1.0,
        clip_norm=clip,
        num_sampled_clients=4,
        tolerance=1,
        rng=random.Random(5),
    )
    g = out.grid
    assert g == 2.0 ** round(math.log2(g)) and g * math.sqrt(d) <= 2 * clip * 2.0**-SLACK_BITS
    ints = out.values / g
    assert np.array_equal(ints, np.rint(ints))  # exact multiples of g
    noise = ints - np.rint(x / g)
    inflation = 1 + g * math.sqrt(d) / (2 * clip)  # the rounding's extra sensitivity
    assert 1 < inflation <= 1 + 2.0**-SLACK_BITS
    share = inflation * 1.0 * clip / math.sqrt(4 - 1)
    assert abs(noise.std() * g / share - 1) < 5 / math.sqrt(2 * d)
    assert float(out.share_variance) >= (share / g) ** 2  # rounded up, never down
    # 3 honest shares of s^2 g^2 over the rounded sensitivity 2C + g sqrt(d): >= σ = 1
    assert 1.0 <= out.effective_noise_multiplier < 1.0 + 1e-6


def test_neighbouring_inputs_have_the_same_support() -> None:
    """Whatever x, the output lies on g Z: its bits cannot tell x from x' (Mironov)."""
    g = grid_step(clip_norm=1.0, dim=2)
    for x in (np.array([0.3, -0.1]), np.array([0.3 + 1e-12, -0.1])):
        out = discrete_noisy_update(
            x,
            noise_multiplier=2.0,
            clip_norm=1.0,
            num_sampled_clients=2,
            tolerance=0,
            rng=random.Random(6),
        )
        assert out.grid == g
        assert np.array_equal(out.values / g, np.rint(out.values / g))


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.array([2.0, 0.0]), {}, r"`clipped` has L2 norm 2 > `clip_norm` = 1.0; pass the"),
        (np.array([np.nan, 0.0]), {}, "`clipped` contains NaN or inf"),
        (
            np.zeros(2),
            {"noise_multiplier": 1e-6},
            r"the share's scale is .* grid steps \(< 8\); raise `noise-multiplier`",
        ),
    ],
)
def test_bad_releases_are_refused(x: np.ndarray, kwargs: dict[str, float], match: str) -> None:
    args = {"noise_multiplier": 1.0, "clip_norm": 1.0, "num_sampled_clients": 2, "tolerance": 0}
    with pytest.raises(ValueError, match=match):
        discrete_noisy_update(x, **{**args, **kwargs}, rng=random.Random(0))  # type: ignore[arg-type]


def test_keystream_integers_are_uniform_reproducible_and_stateless() -> None:
    from fedtune.privacy.discrete import KeystreamRandom
    from fedtune.privacy.noise import SeededNoise

    rng = KeystreamRandom(SeededNoise(7))
    draws = [rng.randrange(10) for _ in range(50_000)]
    assert stats.chisquare(np.bincount(draws, minlength=10)).pvalue > 1e-3
    big = [rng.randrange(3 * 2**70) for _ in range(20_000)]  # several words per draw
    assert stats.kstest(np.array(big, dtype=float) / (3 * 2**70), "uniform").pvalue > 1e-3
    again = KeystreamRandom(SeededNoise(7))
    assert [again.randrange(10) for _ in range(100)] == draws[:100]
    assert [KeystreamRandom(SeededNoise(8)).randrange(10) for _ in range(100)] != draws[:100]
    assert rng.getrandbits(0) == 0
    with pytest.raises(NotImplementedError, match="no state to save"):
        rng.getstate()


def test_the_discrete_gaussian_from_the_keystream_follows_the_pmf() -> None:
    from fedtune.privacy.discrete import KeystreamRandom
    from fedtune.privacy.noise import SeededNoise

    rng = KeystreamRandom(SeededNoise(9))
    samples = [discrete_gaussian(Fraction(5, 2), rng) for _ in range(20_000)]
    assert _chi2_pvalue(samples, 2.5, 10) > 1e-3


def test_client_level_releases_the_clipped_update_and_share_on_the_grid() -> None:
    """The wiring (fedtune/train/levels.py): what a client-level round releases."""
    from types import SimpleNamespace

    from fedtune.privacy.noise import SeededNoise
    from fedtune.train.levels import ClientLevel

    d, clip = 500, 0.5
    trainer = SimpleNamespace(cfg=SimpleNamespace(privacy=SimpleNamespace(max_grad_norm=clip)))
    plan = SimpleNamespace(noise_multiplier=1.0, tolerance=0)
    trained = np.full(d, 1.0)  # norm sqrt(500): clipped to 0.5
    out = ClientLevel().transform(
        np.zeros(d), trained, trainer=trainer, plan=plan, noise=SeededNoise(3), sampled_clients=2
    )
    g = grid_step(clip_norm=clip, dim=d)
    assert out.num_examples == 1
    assert np.array_equal(out.vector / g, np.rint(out.vector / g))
    assert abs((out.vector - clip / math.sqrt(d)).std() / (clip / math.sqrt(2)) - 1) < 0.15
    with pytest.raises(TypeError, match="draws from a ChaChaNoise keystream"):
        ClientLevel().transform(
            np.zeros(d),
            trained,
            trainer=trainer,
            plan=plan,
            noise=object(),
            sampled_clients=2,
        )


# --- the vectorised sampler (fedtune/privacy/discrete_array.py) ------------------------


def _vector(sigma2: Fraction, n: int, seed: int) -> list[int]:
    from fedtune.privacy.discrete import KeystreamRandom
    from fedtune.privacy.discrete_array import discrete_gaussian_array
    from fedtune.privacy.noise import SeededNoise

    return discrete_gaussian_array(sigma2, n, KeystreamRandom(SeededNoise(seed))).tolist()


@pytest.mark.parametrize(
    "sigma2",
    # 2^28 + 1 over 2^28: lanes with |y| > 8 take the Python-integer path (|c| >= 2^32)
    [Fraction(9, 4), Fraction(7, 3), Fraction(30), Fraction(2**28 + 1, 2**28)],
)
def test_vectorised_samples_follow_the_exact_pmf(sigma2: Fraction) -> None:
    samples = _vector(sigma2, 20_000, seed=11)
    width = 4 * math.isqrt(int(sigma2) + 1) + 4
    assert _chi2_pvalue(samples, float(sigma2), width) > 1e-3
    assert _chi2_pvalue(samples, 1.1 * float(sigma2), width) < 1e-3  # it can fail


def test_vectorised_large_scale_has_the_right_mean_variance_and_kurtosis() -> None:
    """``s^2 = 10^9``: the acceptance denominator ``2 s^2 t^2`` is 2^61 (the int64 edge)."""
    from fedtune.privacy.discrete_array import MAX_MODULUS, _denominator

    sigma2 = Fraction(10**9)
    assert MAX_MODULUS // 4 < _denominator(sigma2) < MAX_MODULUS
    z = np.array(_vector(sigma2, 50_000, seed=12), dtype=float)
    n, s = len(z), math.sqrt(1e9)
    assert abs(z.mean()) < 5 * s / math.sqrt(n)
    assert abs(z.var() / 1e9 - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)


def test_vectorised_and_scalar_samplers_have_the_same_law() -> None:
    from fedtune.privacy.discrete import KeystreamRandom
    from fedtune.privacy.noise import SeededNoise

    sigma2 = Fraction(5, 2)
    rng = KeystreamRandom(SeededNoise(13))
    scalar = np.array([discrete_gaussian(sigma2, rng) for _ in range(20_000)])
    vector = np.array(_vector(sigma2, 20_000, seed=14))
    support = np.arange(-6, 7)  # |y| >= 6 pooled into the end cells
    table = np.array([[np.sum(np.clip(v, -6, 6) == y) for y in support] for v in (scalar, vector)])
    assert stats.chi2_contingency(table).pvalue > 1e-3
    shifted = np.array(_vector(Fraction(3), 20_000, seed=14))  # 20% more variance: caught
    table[1] = [np.sum(np.clip(shifted, -6, 6) == y) for y in support]
    assert stats.chi2_contingency(table).pvalue < 1e-3


def test_vectorised_samples_are_reproducible_from_the_seed() -> None:
    a = _vector(Fraction(30), 1000, seed=15)
    assert a == _vector(Fraction(30), 1000, seed=15)
    assert a != _vector(Fraction(30), 1000, seed=16)


@pytest.mark.parametrize(
    ("sigma2", "n", "match"),
    [
        (Fraction(0), 3, r"`sigma2` must be > 0, got 0"),
        (Fraction(2, 1), -1, r"`n` must be an int >= 0, got -1"),
        (Fraction(10**10), 3, r"2 a b t\^2 = \d+ >= 2\^62 .*round `sigma2` up to an integer"),
        (Fraction(10**12 + 1, 2**20), 3, r"`sigma2` = 1000000000001/1048576 .* >= 2\^62"),
    ],
)
def test_vectorised_sampler_refuses_what_would_overflow(
    sigma2: Fraction, n: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _vector(sigma2, n, seed=0)


def test_client_level_uses_the_vectorised_sampler_from_a_keystream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The release draws its shares in one vectorised call (and the scalar sampler is not
    used), still on the grid."""
    from fedtune.privacy import discrete
    from fedtune.privacy.discrete import KeystreamRandom
    from fedtune.privacy.noise import SeededNoise

    def no_scalar(*_: object) -> int:
        raise AssertionError("the scalar sampler was used")

    monkeypatch.setattr(discrete, "discrete_gaussian", no_scalar)
    x = np.full(400, 0.01)
    out = discrete_noisy_update(
        x,
        noise_multiplier=1.0,
        clip_norm=1.0,
        num_sampled_clients=3,
        tolerance=0,
        rng=KeystreamRandom(SeededNoise(4)),
    )
    ints = out.values / out.grid
    assert np.array_equal(ints, np.rint(ints))
    noise = ints - np.rint(x / out.grid)
    assert abs(noise.std() / math.sqrt(out.share_variance) - 1) < 5 / math.sqrt(800)
