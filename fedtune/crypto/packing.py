"""Encrypt, add and decrypt real vectors of any length.

A vector ``x`` of length ``n`` is cut into ``ceil(n / N)`` chunks of ``N``
values (the last one zero padded); chunk ``i`` becomes one CKKS ciphertext
whose complex slot ``j`` encodes ``x[i*N + 2j] + 1j * x[i*N + 2j + 1]``. Slot
addition is coordinate-wise for real and imaginary parts alike, so

    Dec(sum_k Enc(n_k * w_k)) / sum_k n_k  ==  sum_k n_k w_k / sum_k n_k

up to the CKKS noise: Gaussian with standard deviation
``sqrt(K) * params.fresh_noise_std`` (``sqrt(K) * 1.7e-8`` at the default
parameters) in the sum for ``K`` clients, divided by ``sum_k n_k`` in the mean
(measured, see :mod:`fedtune.crypto`).
That is the FedAvg weighted mean (McMahan et al., "Communication-Efficient
Learning of Deep Networks from Decentralized Data", AISTATS 2017,
https://arxiv.org/abs/1602.05629) computed by a server that adds ciphertexts
it cannot read.
"""

from __future__ import annotations

import numpy as np

from fedtune.crypto._seal import scratch_dir, seal_dump, sealapi
from fedtune.crypto.context import CkksContext
from fedtune.crypto.payload import EncryptedVector, full_coefficients, load_ciphertext
from fedtune.crypto.seal_format import ParsedCiphertext, serialize
from fedtune.errors import PayloadError

__all__ = ["decrypt_vector", "encrypt_vector", "sum_encrypted"]


def encrypt_vector(ctx: CkksContext, vector: np.ndarray, *, scale: float = 1.0) -> EncryptedVector:
    """Encrypt ``scale * vector`` under the shared secret key.

    Parameters
    ----------
    ctx : CkksContext
        A context holding the secret key.
    vector : np.ndarray
        One-dimensional, finite, at least one value.
    scale : float
        Multiplier applied before encryption; a client passes its example
        count ``n_k`` so that the server only has to add.

    Returns
    -------
    EncryptedVector
        Seeded ciphertexts, about ``data_modulus_bits / 8`` bytes per value.

    Raises
    ------
    CryptoError
        If ``ctx`` has no secret key.
    ValueError
        If ``vector`` is not 1-D, is empty, holds NaN/inf, or
        ``|scale * vector|`` exceeds ``ctx.params.max_abs_value``.
    """
    ctx.require_secret_key("encrypt")
    if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.size == 0:
        shape = getattr(vector, "shape", type(vector).__name__)
        raise ValueError(f"`vector` should be a non-empty 1-D numpy array, got {shape}.")
    if not np.isfinite(scale):
        raise ValueError(f"`scale` should be finite, got {scale!r}.")
    values = vector.astype(np.float64, copy=False) * float(scale)
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(f"`vector` should be finite, got {values[bad]} at index {bad}.")
    peak = float(np.max(np.abs(values)))
    p = ctx.params
    if peak > p.max_abs_value:
        raise ValueError(
            f"`scale * vector` reaches {peak:.6g}, beyond max_abs_value={p.max_abs_value:.6g} "
            f"of {p}; lower the scale or choose parameters with more modulus bits."
        )
    n = values.size
    padded = np.zeros(p.chunk_count(n) * p.values_per_chunk, dtype=np.float64)
    padded[:n] = values
    slots = (padded[0::2] + 1j * padded[1::2]).reshape(-1, p.slot_count)

    sa = sealapi()
    chunks: list[bytes] = []
    with scratch_dir() as tmp:
        for row in slots:
            plain = sa.Plaintext()
            ctx._encoder.encode(row.tolist(), p.scale, plain)
            chunks.append(seal_dump(ctx._encryptor.encrypt_symmetric(plain).save, tmp))
    return EncryptedVector(chunks=chunks, length=n, fingerprint=ctx.fingerprint)


def _check_shape(ctx: CkksContext, enc: EncryptedVector, field: str) -> None:
    if enc.fingerprint != ctx.fingerprint:
        raise PayloadError(
            f"`{field}.fingerprint` {enc.fingerprint[:80]!r} does not match the context "
            f"{ctx.fingerprint!r}."
        )
    if isinstance(enc.length, bool) or not isinstance(enc.length, int) or enc.length < 1:
        raise PayloadError(f"`{field}.length` should be a positive int, got {enc.length!r}.")
    expected = ctx.params.chunk_count(enc.length)
    if len(enc.chunks) != expected:
        raise PayloadError(
            f"`{field}.chunks` should hold {expected} ciphertexts for length {enc.length}, "
            f"got {len(enc.chunks)}."
        )


def sum_encrypted(ctx: CkksContext, items: list[EncryptedVector]) -> EncryptedVector:
    """Add encrypted vectors slot-wise; needs no secret key.

    Ciphertexts add coefficient-wise modulo each prime, ``(a0 + b0, a1 + b1)``,
    which is all SEAL's ``Evaluator::add`` does for CKKS at equal scale and
    level. The addition is done here in numpy on coefficients parsed by
    :func:`fedtune.crypto.seal_format.parse_ciphertext`, so it cannot fail on
    items that passed :func:`fedtune.crypto.validate_encrypted` (SEAL's add
    throws when a sum turns out transparent; ours returns it, and every
    receiver refuses a transparent ciphertext).

    Parameters
    ----------
    ctx : CkksContext
        The server's public context (a secret one works too).
    items : list[EncryptedVector]
        At least one vector, all of the same length and fingerprint; each
        should have passed :func:`fedtune.crypto.validate_encrypted`.

    Returns
    -------
    EncryptedVector
        ``Enc(sum of the items)``, unseeded, zstd-compressed as SEAL would:
        twice the bytes of one upload.

    Raises
    ------
    PayloadError
        If an item does not match ``ctx`` or a chunk does not parse; the
        message names the item and chunk, e.g. ``items[3].chunks[7]``.
    ValueError
        If ``items`` is empty or the lengths differ.
    """
    if not items:
        raise ValueError("`items` should hold at least one EncryptedVector, got an empty list.")
    length = items[0].length
    for k, item in enumerate(items):
        _check_shape(ctx, item, f"items[{k}]")
        if item.length != length:
            raise ValueError(f"`items[{k}].length` is {item.length}, but items[0] has {length}.")

    primes = np.array(ctx.layout.primes, dtype=np.uint64)[None, :, None]
    out: list[bytes] = []
    with scratch_dir() as tmp:
        for i in range(len(items[0].chunks)):
            acc = full_coefficients(
                ctx, items[0].chunks[i], field=f"items[0].chunks[{i}]", directory=tmp
            ).copy()
            for k in range(1, len(items)):
                # Both terms are below q < 2**61, so the uint64 sum cannot overflow.
                acc += full_coefficients(
                    ctx, items[k].chunks[i], field=f"items[{k}].chunks[{i}]", directory=tmp
                )
                np.subtract(acc, primes, out=acc, where=acc >= primes)
            out.append(serialize(ctx.layout, ParsedCiphertext(acc, None), compress=True))
    return EncryptedVector(chunks=out, length=length, fingerprint=ctx.fingerprint)


def decrypt_vector(ctx: CkksContext, enc: EncryptedVector) -> np.ndarray:
    """Decrypt to a float64 array of ``enc.length`` values.

    Raises
    ------
    CryptoError
        If ``ctx`` has no secret key.
    PayloadError
        If ``enc`` does not match ``ctx`` or a chunk does not deserialise.
    """
    ctx.require_secret_key("decrypt")
    _check_shape(ctx, enc, "enc")
    sa = sealapi()
    p = ctx.params
    out = np.empty(len(enc.chunks) * p.values_per_chunk, dtype=np.float64)
    with scratch_dir() as tmp:
        for i, chunk in enumerate(enc.chunks):
            ct = load_ciphertext(ctx, chunk, field=f"enc.chunks[{i}]", directory=tmp)
            plain = sa.Plaintext()
            ctx._decryptor.decrypt(ct, plain)
            slots = np.asarray(ctx._encoder.decode_complex(plain), dtype=np.complex128)
            lo = i * p.values_per_chunk
            out[lo : lo + p.values_per_chunk : 2] = slots.real
            out[lo + 1 : lo + p.values_per_chunk : 2] = slots.imag
    return out[: enc.length]
