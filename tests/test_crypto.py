"""Tests of fedtune.crypto: parameters, keys, packing, aggregation, payload checks."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from fedtune.crypto import (
    DEFAULT_PARAMS,
    MAX_COEFF_MODULUS_BITS_128,
    CkksContext,
    CkksParams,
    CryptoError,
    EncryptedVector,
    PayloadError,
    decrypt_vector,
    encrypt_vector,
    fingerprint,
    has_secret_key,
    load_context,
    make_secret_context,
    public_context,
    save_keys,
    sum_encrypted,
    validate_wire,
)

N = DEFAULT_PARAMS.values_per_chunk
# Worst error per parameter the weighted mean may show: 5x under the project's
# 1e-6; 11.7 noise standard deviations at DEFAULT_PARAMS, so it never fails by chance.
MAX_ERROR = 2e-7
# Trainable parameters of the default model (LoRA r=8 on query,value of
# MiniLM-L6: 73,728; an 8-label head: 3,080).
MODEL_LENGTH = 76_808


@pytest.fixture(scope="module")
def ctx() -> CkksContext:
    return make_secret_context(DEFAULT_PARAMS)


@pytest.fixture(scope="module")
def pub(ctx: CkksContext) -> CkksContext:
    return public_context(ctx)


# ----- parameters -----------------------------------------------------------


def test_security_table_matches_seal() -> None:
    import tenseal.sealapi as sa

    for n, bits in MAX_COEFF_MODULUS_BITS_128.items():
        assert sa.CoeffModulus.MaxBitCount(n, sa.SEC_LEVEL_TYPE.TC128) == bits


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"poly_modulus_degree": 3000},
            r"`poly_modulus_degree` should be one of .* got 3000",
        ),
        (
            {"coeff_mod_bit_sizes": ()},
            r"`coeff_mod_bit_sizes` should be a non-empty tuple",
        ),
        (
            {"coeff_mod_bit_sizes": (61,)},
            r"entries should lie in \[20, 60\], got \(61,\)",
        ),
        (
            {"poly_modulus_degree": 2048, "coeff_mod_bit_sizes": (30, 30)},
            r"total 60 bits, more than the 54 bits allowed at 128-bit security",
        ),
        (
            {"global_scale_bits": 59},
            r"`global_scale_bits` should be an int in \[1, 57\].*got 59",
        ),
    ],
)
def test_params_validation_names_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CkksParams(**kwargs)  # type: ignore[arg-type]


def test_default_params_range_and_sizes() -> None:
    p = DEFAULT_PARAMS
    # 100 clients x 1e5 examples x |w| <= 1 must not wrap around modulo q.
    assert p.max_abs_value >= 1e7
    assert p.values_per_chunk == 4096
    assert p.chunk_count(1) == 1 and p.chunk_count(N) == 1 and p.chunk_count(N + 1) == 2


def test_default_params_noise_leaves_headroom() -> None:
    # By hand: sqrt(N/2 * (10.5 + 1/12)) / 2**33 = sqrt(2048 * 10.58333) / 2**33
    # = 147.2232 / 8589934592.
    assert DEFAULT_PARAMS.fresh_noise_std == pytest.approx(147.2232 / 8589934592, rel=1e-5)
    # The error bound must sit at least 10 standard deviations out (q=58, 2^32: 5.8).
    assert MAX_ERROR / DEFAULT_PARAMS.fresh_noise_std >= 10


def test_default_params_wire_size_within_budget(ctx: CkksContext, pub: CkksContext) -> None:
    # The project's budget: at most 16 bytes per trainable parameter on the wire,
    # both ways. Measured 8.00 / 15.93 (benchmarks/bench_crypto.py).
    x = np.random.default_rng(5).normal(0.0, 0.05, MODEL_LENGTH)
    up = encrypt_vector(ctx, x, scale=300.0)
    agg = sum_encrypted(pub, [up, encrypt_vector(ctx, x, scale=200.0)])
    assert up.nbytes / MODEL_LENGTH <= 8.1
    assert agg.nbytes / MODEL_LENGTH <= 16.0


# ----- keys and fingerprints ------------------------------------------------


def test_fingerprint_shared_by_public_copy_and_distinct_per_keygen(
    ctx: CkksContext, pub: CkksContext
) -> None:
    assert has_secret_key(ctx) and not has_secret_key(pub)
    assert fingerprint(ctx) == fingerprint(pub)
    assert len(fingerprint(ctx)) == 64
    assert fingerprint(make_secret_context(DEFAULT_PARAMS)) != fingerprint(ctx)


def test_save_and_load_keys(ctx: CkksContext, tmp_path: Path) -> None:
    files = save_keys(ctx, tmp_path / "keys")
    assert stat.S_IMODE(files.secret.stat().st_mode) == 0o600
    assert files.fingerprint.read_text().strip() == fingerprint(ctx)

    secret = load_context(files.secret)
    public = load_context(files.public)
    assert has_secret_key(secret) and not has_secret_key(public)
    assert fingerprint(secret) == fingerprint(public) == fingerprint(ctx)
    # The public file carries no key material at all: it is one JSON line.
    assert (
        files.public.read_bytes().count(b"\n") == 1
        and b'"secret_key_bytes": 0' in files.public.read_bytes()
    )

    x = np.random.default_rng(1).normal(size=10)
    enc = encrypt_vector(ctx, x)
    np.testing.assert_allclose(decrypt_vector(secret, enc), x, rtol=0, atol=MAX_ERROR)
    with pytest.raises(CryptoError, match=r"cannot decrypt: this CKKS context has no secret key"):
        decrypt_vector(public, enc)
    with pytest.raises(CryptoError, match=r"cannot encrypt: this CKKS context has no secret key"):
        encrypt_vector(public, x)
    with pytest.raises(FileExistsError):
        save_keys(ctx, tmp_path / "keys")


def test_tampered_key_file_rejected(ctx: CkksContext, tmp_path: Path) -> None:
    files = save_keys(ctx, tmp_path)
    data = bytearray(files.secret.read_bytes())
    data[-5] ^= 0x01
    files.secret.write_bytes(bytes(data))
    with pytest.raises(CryptoError, match=r"secret key does not match its key_id"):
        load_context(files.secret)


# ----- packing --------------------------------------------------------------


@pytest.mark.parametrize("length", [1, N - 1, N, N + 1, 3 * N + 17])
def test_round_trip(ctx: CkksContext, length: int) -> None:
    x = np.random.default_rng(length).uniform(-1.0, 1.0, length)
    enc = encrypt_vector(ctx, x)
    assert enc.length == length and len(enc.chunks) == -(-length // N)
    out = decrypt_vector(ctx, enc)
    assert out.dtype == np.float64 and out.shape == (length,)
    np.testing.assert_allclose(out, x, rtol=0, atol=MAX_ERROR)


@pytest.mark.slow
def test_round_trip_one_million(ctx: CkksContext) -> None:
    x = np.random.default_rng(7).normal(0.0, 0.1, 1_000_000).astype(np.float32)
    enc = encrypt_vector(ctx, x)
    assert len(enc.chunks) == 245  # ceil(1e6 / 4096)
    assert enc.nbytes / x.size < 8.0  # seeded upload, measured 7.92 (bench_crypto.py)
    np.testing.assert_allclose(
        decrypt_vector(ctx, enc), x.astype(np.float64), rtol=0, atol=MAX_ERROR
    )


def test_weighted_mean_matches_numpy(ctx: CkksContext, pub: CkksContext) -> None:
    rng = np.random.default_rng(42)
    length = N + 123
    counts = [1, 17, 2_500, 100_000, 99_999]
    ws = [rng.uniform(-1.0, 1.0, length) for _ in counts]
    uploads = [encrypt_vector(ctx, w, scale=n) for w, n in zip(ws, counts, strict=True)]
    received = [
        validate_wire(
            u.to_wire(),
            params=pub.params,
            expected_fingerprint=fingerprint(pub),
            expected_length=length,
        )
        for u in uploads
    ]
    agg = sum_encrypted(pub, received)
    agg = validate_wire(
        agg.to_wire(),
        params=pub.params,
        expected_fingerprint=fingerprint(pub),
        expected_length=length,
        max_chunk_bytes=pub.params.max_chunk_bytes(polys=2),
    )
    mean = decrypt_vector(ctx, agg) / sum(counts)
    # Worked out in the clear: sum_k n_k w_k / sum_k n_k.
    expected = (1 * ws[0] + 17 * ws[1] + 2_500 * ws[2] + 100_000 * ws[3] + 99_999 * ws[4]) / 202_517
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-6)
    assert np.max(np.abs(mean - expected)) < 1e-9


def test_single_small_client_is_precise(ctx: CkksContext, pub: CkksContext) -> None:
    # The hardest corner: sum n_k = 1, so the absolute CKKS noise is the mean's error.
    w = np.random.default_rng(3).uniform(-1.0, 1.0, 4 * N)
    mean = decrypt_vector(ctx, sum_encrypted(pub, [encrypt_vector(ctx, w, scale=1.0)]))
    assert np.max(np.abs(mean - w)) < MAX_ERROR
    # The noise is what CkksParams.fresh_noise_std predicts (its estimate from
    # 16,384 values is within 1% of the truth at 1 sd).
    sd = float(np.std(mean - w))
    assert 0.95 < sd / DEFAULT_PARAMS.fresh_noise_std < 1.05


@pytest.mark.parametrize(
    ("vector", "scale", "match"),
    [
        (
            np.zeros((2, 2)),
            1.0,
            r"`vector` should be a non-empty 1-D numpy array, got \(2, 2\)",
        ),
        (
            np.zeros(0),
            1.0,
            r"`vector` should be a non-empty 1-D numpy array, got \(0,\)",
        ),
        (
            np.array([0.0, np.nan]),
            1.0,
            r"`vector` should be finite, got nan at index 1",
        ),
        (np.ones(3), float("inf"), r"`scale` should be finite, got inf"),
        (np.ones(3), 1e8, r"`scale \* vector` reaches 1e\+08, beyond max_abs_value"),
    ],
)
def test_encrypt_rejects_bad_input(
    ctx: CkksContext, vector: np.ndarray, scale: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encrypt_vector(ctx, vector, scale=scale)


# ----- untrusted payloads ---------------------------------------------------


def test_fingerprint_mismatch_rejected(ctx: CkksContext, pub: CkksContext) -> None:
    other = make_secret_context(DEFAULT_PARAMS)
    foreign = encrypt_vector(other, np.ones(5))
    with pytest.raises(
        PayloadError,
        match=r"`fingerprint` .* does not match this federation's CKKS context",
    ):
        validate_wire(
            foreign.to_wire(),
            params=pub.params,
            expected_fingerprint=fingerprint(pub),
            expected_length=5,
        )
    with pytest.raises(
        PayloadError, match=r"`items\[1\].fingerprint` .* does not match the context"
    ):
        sum_encrypted(pub, [encrypt_vector(ctx, np.ones(5)), foreign])


def test_sum_rejects_empty_and_mismatched_lengths(ctx: CkksContext, pub: CkksContext) -> None:
    with pytest.raises(ValueError, match=r"`items` should hold at least one EncryptedVector"):
        sum_encrypted(pub, [])
    with pytest.raises(ValueError, match=r"`items\[1\].length` is 6, but items\[0\] has 5"):
        sum_encrypted(pub, [encrypt_vector(ctx, np.ones(5)), encrypt_vector(ctx, np.ones(6))])


def test_wire_round_trip_plain_types(ctx: CkksContext) -> None:
    enc = encrypt_vector(ctx, np.arange(10.0))
    wire = enc.to_wire()
    assert set(wire) == {"chunks", "length", "fingerprint"}
    assert all(isinstance(c, bytes) for c in wire["chunks"])
    assert EncryptedVector.from_wire(wire) == enc
