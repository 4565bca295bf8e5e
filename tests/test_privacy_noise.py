"""CSPRNG, float-safe Gaussian noise (fedtune.privacy.noise) and its use in DP-SGD."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cryptography")
stats = pytest.importorskip("scipy.stats")

from fedtune.privacy.noise import (  # noqa: E402
    ChaChaNoise,
    CsprngNoise,
    NoiseSource,
    SeededNoise,
)

# RFC 8439 appendix A.1, test vector #1: key 0^32, nonce 0^12, block counter 0.
RFC8439_A1_KEYSTREAM = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


# --- keystream and the method, against values worked out independently ------------------


def test_first_draw_is_the_rfc8439_keystream() -> None:
    words = ChaChaNoise(bytes(32))._words(8)
    assert words.astype("<u8").tobytes() == RFC8439_A1_KEYSTREAM


def _scalar_polar(words: list[int], count: int) -> list[tuple[float, float]]:
    """The polar method one candidate at a time with ``math``: the first accepted pairs."""
    m = len(words) // 2
    out = []
    for t in range(m):
        u = (words[t] >> 11) * 2.0**-52 - 1.0
        v = (words[m + t] >> 11) * 2.0**-52 - 1.0
        s = u * u + v * v
        if 0.0 < s < 1.0:
            f = math.sqrt(-2.0 * math.log(s) / s)
            out.append((u * f, v * f))
    assert len(out) >= count, "the first request accepted too few; pick another key"
    return out[:count]


@pytest.mark.parametrize("flavour", ["numpy", "torch"])
def test_values_follow_the_documented_recipe(flavour: str) -> None:
    """std * (g1 + g2 + g3 + g4) / 2 from the keystream, recomputed with ``math``."""
    from fedtune.privacy.noise import _candidates

    # Two values need four accepted pairs; the first request is _candidates(4) pairs
    # under nonce 0, whose first eight words are the RFC 8439 test vector.
    words = [int(w) for w in ChaChaNoise(bytes(32))._words(2 * _candidates(4))]
    assert np.array(words[:8], dtype="<u8").tobytes() == RFC8439_A1_KEYSTREAM
    z = _scalar_polar(words, 4)
    g = [z[0][0] + z[2][0] + z[1][1] + z[3][1], z[1][0] + z[3][0] + z[2][1] + z[0][1]]
    expected = [3.0 * x / 2.0 for x in g]
    source = ChaChaNoise(bytes(32))
    if flavour == "numpy":
        got = source.normal_numpy((2,), 3.0)
    else:
        got = source.normal((2,), 3.0, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_no_value_sums_both_normals_of_one_pair() -> None:
    """Both normals of one accepted pair must land in two different values ((u + v) f,
    the sum of one pair's normals, is a single Gaussian)."""
    from fedtune.privacy.noise import _combine

    rng = np.random.default_rng(0)
    n = 5
    z1, z2 = rng.standard_normal(2 * n), rng.standard_normal(2 * n)
    base = _combine(z1.copy(), z2.copy())
    for j in range(2 * n):
        b1, b2 = z1.copy(), z2.copy()
        b1[j] += 1.0
        b2[j] += 1.0
        changed = np.flatnonzero(_combine(b1, b2) != base)
        assert len(changed) == 2, f"pair {j} changed values {changed.tolist()}"


def test_polar_method_rejects_outside_the_unit_disc_and_zero() -> None:
    from fedtune.privacy.noise import _polar_numpy

    def word(u: float) -> int:  # the word whose top 53 bits give u = k 2^-52 - 1
        return int((u + 1.0) * 2**52) << 11

    us = [0.6, 0.0, 0.9, -1.0, 0.3]
    vs = [0.8, 0.0, 0.5, 0.0, -0.4]  # s = 1.0 (out), 0 (out), 1.06 (out), 1.0 (out), 0.25
    words = np.array([word(u) for u in us] + [word(v) for v in vs], dtype=np.uint64)
    z1, z2 = _polar_numpy(words)
    f = math.sqrt(-2.0 * math.log(0.25) / 0.25)
    np.testing.assert_allclose(z1, [0.3 * f], rtol=1e-12)
    np.testing.assert_allclose(z2, [-0.4 * f], rtol=1e-12)


def test_too_few_accepted_pairs_are_made_up_by_further_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedtune.privacy import noise

    monkeypatch.setattr(noise, "_candidates", lambda pairs: 3)  # about 2.4 accepted each
    source = SeededNoise(21)
    z = source.normal_numpy((1000,), 1.0)
    assert source._draws > 600  # 2000 pairs from requests of 3 candidates
    assert np.isfinite(z).all() and len(np.unique(z)) == 1000
    assert abs(z.std() - 1.0) < 0.15
    again = SeededNoise(21).normal((1000,), 1.0, dtype=torch.float64).numpy()
    assert np.array_equal(again, z)


# --- statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["numpy", "torch"])
def test_distribution_is_normal_with_the_given_std(flavour: str) -> None:
    n, std = 200_000, 2.5
    source = SeededNoise(1234)
    if flavour == "numpy":
        z = source.normal_numpy((n,), std)
    else:
        z = source.normal((n,), std, dtype=torch.float64).numpy()
    # mean: 5 standard errors; std: 5 standard errors of the sample std (std/sqrt(2n))
    assert abs(z.mean()) < 5 * std / math.sqrt(n)
    assert abs(z.std() - std) < 5 * std / math.sqrt(2 * n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)  # excess kurtosis of N is 0
    assert stats.kstest(z / std, "norm").pvalue > 1e-3
    # a wrong scale is caught by the same test (the test can fail)
    assert stats.kstest(z / (1.05 * std), "norm").pvalue < 1e-6


def test_values_of_one_draw_are_uncorrelated() -> None:
    z = SeededNoise(5).normal_numpy((100_000,), 1.0)
    for lag in (1, 2, 50_000):  # 50_000: value i and n/2 + i share the word layout
        corr = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(corr) < 5 / math.sqrt(len(z)), f"lag {lag}: correlation {corr:.4f}"


def test_zero_std_and_empty_shapes() -> None:
    source = SeededNoise(0)
    assert np.array_equal(source.normal_numpy((3,), 0.0), np.zeros(3))
    assert source.normal((0, 4), 1.0).shape == (0, 4)
    assert torch.equal(source.normal((2, 2), 0.0), torch.zeros(2, 2))
    single = source.normal_numpy((1,), 1.0)  # one value still draws four distinct pairs
    assert single.shape == (1,) and np.isfinite(single).all()


# --- key sources --------------------------------------------------------------------------


def test_seeded_noise_is_reproducible_and_seed_specific() -> None:
    a, b = SeededNoise(7), SeededNoise(7)
    first = a.normal((1000,), 1.0)
    assert torch.equal(first, b.normal((1000,), 1.0))
    assert np.array_equal(a.normal_numpy((10, 3), 1.0), b.normal_numpy((10, 3), 1.0))
    assert not torch.equal(first, a.normal((1000,), 1.0)), "a second draw repeated the first"
    assert not torch.equal(SeededNoise(8).normal((1000,), 1.0), first)
    assert torch.equal(SeededNoise(b"\x07").normal((1000,), 1.0), first)  # int = its LE bytes


def test_torch_and_numpy_flavours_agree() -> None:
    t = SeededNoise(3).normal((4, 5), 1.5, dtype=torch.float64).numpy()
    assert np.array_equal(t, SeededNoise(3).normal_numpy((4, 5), 1.5))  # same CPU code


def test_draws_larger_than_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.privacy import noise

    monkeypatch.setattr(noise, "_CHUNK_VALUES", 8)
    z = SeededNoise(6).normal_numpy((17,), 1.0)  # chunks of 8, 8 and 1 value(s)
    assert z.shape == (17,) and np.isfinite(z).all() and len(np.unique(z)) == 17
    assert np.array_equal(SeededNoise(6).normal((17,), 1.0, dtype=torch.float64).numpy(), z)


def test_csprng_noise_is_not_reproducible_and_hides_its_key() -> None:
    a, b = CsprngNoise(), CsprngNoise()
    assert not torch.equal(a.normal((64,), 1.0), b.normal((64,), 1.0))
    assert not np.array_equal(a.normal_numpy((64,), 1.0), a.normal_numpy((64,), 1.0))
    assert a._key.hex() not in repr(a) and repr(a) == f"CsprngNoise(draws={a._draws})"
    assert a._draws >= 3
    assert isinstance(a, NoiseSource) and isinstance(SeededNoise(0), NoiseSource)


# --- dtype, device, input checks ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_shape(dtype: torch.dtype | None) -> None:
    z = SeededNoise(0).normal((3, 4), 1.0, dtype=dtype)
    assert z.dtype == (torch.float32 if dtype is None else dtype)
    assert z.shape == (3, 4) and z.device.type == "cpu"


def test_gpu_kernel_computes_the_numpy_recipe() -> None:
    """The torch version (used on CUDA) run on the CPU, against the numpy one."""
    from fedtune.privacy.noise import _polar_numpy, _polar_torch

    words = ChaChaNoise(bytes(32))._words(2 * 1001)
    got = _polar_torch(torch.from_numpy(words.view(np.int64)))
    want = _polar_numpy(words)
    assert len(want[0]) > 700  # about pi/4 of 1001 candidates accepted
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_output_matches_cpu() -> None:
    gpu = SeededNoise(9).normal((1000,), 2.0, device="cuda", dtype=torch.float64)
    cpu = SeededNoise(9).normal((1000,), 2.0, dtype=torch.float64)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.normal((2,), -1.0), r"`std` must be finite and >= 0, got -1.0"),
        (lambda s: s.normal_numpy((2,), math.nan), r"`std` must be finite and >= 0, got nan"),
        (lambda s: s.normal((-1, 2), 1.0), r"`shape` must have non-negative sizes"),
        (lambda s: s.normal((2,), 1.0, dtype=torch.int64), r"floating-point dtype"),
    ],
)
def test_bad_draws_are_refused(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call(SeededNoise(0))


def test_bad_keys_and_seeds_are_refused() -> None:
    with pytest.raises(ValueError, match=r"`key` must be 32 bytes .* length 16"):
        ChaChaNoise(bytes(16))
    with pytest.raises(ValueError, match=r"`seed` must be >= 0, got -1"):
        SeededNoise(-1)
    with pytest.raises(ValueError, match=r"`seed` must be an int or bytes, got float"):
        SeededNoise(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`seed` must be an int or bytes, got bool"):
        SeededNoise(True)


# --- floating-point safety ----------------------------------------------------------------


def _low_bits_chi2_pvalue(values: np.ndarray, bits: int) -> float:
    """Chi-square p-value that the lowest ``bits`` mantissa bits are uniform."""
    as_int = values.view(np.uint64 if values.dtype == np.float64 else np.uint32)
    low = (as_int & ((1 << bits) - 1)).astype(np.int64)
    counts = np.bincount(low, minlength=1 << bits)
    return float(stats.chisquare(counts).pvalue)


def test_low_order_bits_of_float32_noise_are_uniform() -> None:
    """Mironov's attack reads x off the low bits of x + z: they must carry no pattern.

    Float32 (the parameters' dtype) is what DP-SGD releases. The float64 sum itself is
    *not* uniform in its last bits (round-half-to-even when four float64 terms are added;
    chi-square p = 0 at 1e6 samples), which is why the noise is added in float64 and
    rounded once to the parameter dtype.
    """
    z32 = SeededNoise(12).normal((400_000,), 1.0).numpy()
    for bits in (1, 4, 8):
        assert _low_bits_chi2_pvalue(z32, bits) > 1e-4, f"lowest {bits} bits"
    # negative control: float32 noise widened to float64 has all-zero low bits
    assert _low_bits_chi2_pvalue(z32.astype(np.float64), 8) < 1e-100


def test_outputs_for_neighbouring_inputs_share_their_support() -> None:
    """For x and x' one float32 ulp apart, fl32(x + z) reaches every low-bit pattern
    near the same outputs: nothing in the output's last bits tells x from x'."""
    x = np.float32(0.5)
    x_next = np.nextafter(x, np.float32(1.0))
    source = SeededNoise(13)
    for start in (x, x_next):
        z = source.normal_numpy((200_000,), 1e-3)  # |z| << x: outputs share one exponent
        y = (np.float64(start) + z).astype(np.float32)
        low = y.view(np.uint32) & 0xFF
        assert len(np.unique(low)) == 256
        assert _low_bits_chi2_pvalue(y, 6) > 1e-4


# --- DP-SGD takes its noise from the source -----------------------------------------------


def _zero_grad_step(noise: NoiseSource, *, width: int = 64, batch: int = 8) -> torch.Tensor:
    """One DP-SGD step (SGD, lr 1) on a loss with zero gradient; return the update."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from fedtune.privacy.dpsgd import make_dp_training

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    data = TensorDataset(torch.randn(64, width), torch.zeros(64))
    dp = make_dp_training(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data=data,
        expected_batch_size=batch,
        noise_multiplier=1.5,
        max_grad_norm=2.0,
        generator=torch.Generator().manual_seed(0),
        noise=noise,
    )
    x, _ = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    (dp.module(x) * 0.0).sum().backward()
    dp.optimizer.step()
    dp.close()
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


def _grid_noise(seed: int, n: int, *, sigma: float, clip: float) -> torch.Tensor:
    """``g K`` with ``K ~ N_Z(0, s^2)^n`` as the DP-SGD optimizer draws it (one call)."""
    from fedtune.privacy.discrete import KeystreamRandom
    from fedtune.privacy.discrete_array import discrete_gaussian_array
    from fedtune.privacy.optimizer import dpsgd_grid

    spec = dpsgd_grid(clip_norm=clip, noise_multiplier=sigma, dim=n)
    ints = discrete_gaussian_array(spec.sigma2, n, KeystreamRandom(SeededNoise(seed)))
    return torch.from_numpy(ints.astype(np.float64) * spec.grid)


def test_dp_step_adds_the_sources_noise_scaled_by_the_expected_batch_size() -> None:
    update = _zero_grad_step(SeededNoise(21))
    # lr 1, zero clipped gradients: update = g K / expected_batch_size, K the discrete
    # Gaussian drawn in one call for all parameters (weight then bias, in optimizer order)
    expected = _grid_noise(21, update.numel(), sigma=1.5, clip=2.0) / 8
    torch.testing.assert_close(update, expected.float(), rtol=1e-5, atol=1e-7)
    # std s g / 8 = σ (C + g sqrt(d) / 2) / 8: σ C / 8 and at most 1% more
    assert 1.5 * 2.0 / 8 * 0.95 < update.std().item() < 1.5 * 2.0 / 8 * 1.01 * 1.05


def test_seeded_runs_repeat_and_csprng_runs_do_not() -> None:
    assert torch.equal(_zero_grad_step(SeededNoise(4)), _zero_grad_step(SeededNoise(4)))
    assert not torch.equal(_zero_grad_step(CsprngNoise()), _zero_grad_step(CsprngNoise()))
    default = _zero_grad_step(None)  # type: ignore[arg-type]  # None: a fresh CsprngNoise
    assert default.abs().sum() > 0 and not torch.equal(default, _zero_grad_step(None))  # type: ignore[arg-type]


def test_clipping_and_scaling_are_opacus_own() -> None:
    """With noise negligible, the sourced optimizer's gradient equals Opacus' DPOptimizer's
    up to the grid: each of the 6 rows moves by at most g / 2 per coordinate, / 4."""
    from opacus.optimizers import DPOptimizer
    from torch import nn

    from fedtune.privacy.optimizer import dpsgd_grid, sourced_dp_optimizer

    grads = []
    for make in (
        lambda opt: DPOptimizer(
            opt, noise_multiplier=1e-12, max_grad_norm=0.1, expected_batch_size=4
        ),
        lambda opt: sourced_dp_optimizer()(
            opt,
            noise=SeededNoise(0),
            noise_multiplier=1e-12,
            max_grad_norm=0.1,
            expected_batch_size=4,
        ),
    ):
        from opacus.grad_sample import GradSampleModule

        torch.manual_seed(1)
        model = GradSampleModule(nn.Linear(3, 2), loss_reduction="mean")
        opt = make(torch.optim.SGD(model.parameters(), lr=0.0))
        x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
        opt.zero_grad()
        model(x).pow(2).sum(1).mean().backward()
        opt.step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 1e-3
    g = dpsgd_grid(clip_norm=0.1, noise_multiplier=1e-12, dim=8).grid
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=6 * g / 2 / 4 + 1e-7)
    assert not torch.equal(grads[1], grads[0])  # rounded: the rows are on the grid


def test_empty_poisson_batch_takes_a_pure_noise_step() -> None:
    """A zero-row batch through the GradSampleModule still steps with g K / B."""
    from opacus.grad_sample import GradSampleModule
    from torch import nn

    from fedtune.privacy.optimizer import sourced_dp_optimizer

    torch.manual_seed(0)
    model = GradSampleModule(nn.Linear(16, 4), loss_reduction="mean")
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = sourced_dp_optimizer()(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise=SeededNoise(30),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=2,
    )
    opt.zero_grad()
    model(torch.zeros(0, 16)).pow(2).sum(1).mean().backward()  # mean of nothing: nan, no rows
    opt.step()
    update = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = _grid_noise(30, update.numel(), sigma=1.0, clip=1.0) / 2
    torch.testing.assert_close(update, expected.float(), rtol=1e-5, atol=1e-7)


def test_noise_and_the_deprecated_generator_are_exclusive() -> None:
    from torch import nn
    from torch.utils.data import TensorDataset

    from fedtune.privacy.dpsgd import make_dp_training

    model = nn.Sequential(nn.Linear(4, 2))
    kw = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data=TensorDataset(torch.zeros(32, 4), torch.zeros(32)),
        expected_batch_size=8,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        generator=torch.Generator(),
    )
    with pytest.raises(ValueError, match=r"either `noise` .* or the deprecated `noise_generator`"):
        make_dp_training(**kw, noise=SeededNoise(0), noise_generator=torch.Generator())
    with pytest.raises(ValueError, match=r"`noise` must be a NoiseSource .* got Generator"):
        make_dp_training(**kw, noise=torch.Generator())
    with pytest.warns(DeprecationWarning, match="non-cryptographic torch.Generator"):
        dp = make_dp_training(**kw, noise_generator=torch.Generator().manual_seed(1))
    assert type(dp.optimizer).__name__ == "DPOptimizer"  # the old path, unchanged


# --- the floating-point argument of docs/float-noise.md ----------------------------------


def test_normals_are_the_exact_polar_values_of_their_uniforms_to_a_few_ulps() -> None:
    """The float64 evaluation error of the polar method, against 120-bit arithmetic.

    docs/float-noise.md: the implemented normal is the exact polar-method value of its
    two 53-bit uniforms up to float64 evaluation error, measured here as at most 13 units
    of 2^-52 * max(1, |z|) over 3,169 accepted pairs (SeededNoise(4)); the bound 64 fails
    for float32 arithmetic (2^29 units) or a formula that cancels (e.g. log1p misuse).
    """
    mpmath = pytest.importorskip("mpmath")
    from fedtune.privacy.noise import _polar_numpy

    m = 4000
    words = SeededNoise(4)._words(2 * m)
    z1, z2 = _polar_numpy(words.copy())
    top = [int(w) for w in words >> np.uint64(11)]
    exact: list[tuple[float, float]] = []
    with mpmath.workprec(120):
        for a, b in zip(top[:m], top[m:], strict=True):
            u = mpmath.mpf(a) * mpmath.mpf(2) ** -52 - 1
            v = mpmath.mpf(b) * mpmath.mpf(2) ** -52 - 1
            s = u * u + v * v
            if 0 < s < 1:
                f = mpmath.sqrt(-2 * mpmath.log(s) / s)
                exact.append((float(u * f), float(v * f)))
    assert len(exact) == len(z1) == 3169
    e1, e2 = (np.array(col) for col in zip(*exact, strict=True))
    err = np.maximum(
        np.abs(z1 - e1) / np.maximum(1.0, np.abs(e1)), np.abs(z2 - e2) / np.maximum(1.0, np.abs(e2))
    )
    assert err.max() <= 64 * 2.0**-52
    # the same check catches the recipe evaluated in float32: it can fail
    k = (np.array(top, dtype=np.float64) * 2.0**-52 - 1.0).astype(np.float32)
    u32, v32 = k[:m], k[m:]
    s32 = u32 * u32 + v32 * v32
    ok = (s32 > 0) & (s32 < 1)
    f32 = np.sqrt(np.float32(-2.0) * np.log(s32[ok]) / s32[ok])
    assert len(f32) == len(e1)  # the same pairs accepted here
    assert np.abs(u32[ok] * f32 - e1).max() > 64 * 2.0**-52
