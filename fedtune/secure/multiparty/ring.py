"""Arithmetic in SEAL's RNS representation: residues mod each data prime, NTT form.

Every polynomial here is a ``uint64`` array of shape ``(L, N)``: coefficient ``j`` of
the residue modulo prime ``q_i`` in row ``i``, in the *NTT form* SEAL keeps keys and
CKKS ciphertexts in (evaluation at the primitive ``2N``-th roots of unity, SEAL's
order). Products of polynomials are then coefficient-wise products modulo ``q_i``,
so nothing here needs an NTT of its own except the smudging noise, which is sampled
in coefficient form and transformed *by SEAL* (:func:`to_ntt`: a non-NTT ciphertext
built from the numbers, ``Evaluator::transform_to_ntt``, parsed back). The one
transform therefore is SEAL's; the known-answer test is that SEAL's own secret key,
brought back with :func:`from_ntt`, is ternary (``tests/test_multiparty.py``).

Products of two residues below ``2^60`` need 120 bits: they are formed on Python
integers (numpy ``object`` arrays), exact, about 3 ms per ``(2, 8192)`` product.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtune.crypto._seal import scratch_dir, seal_dump, seal_load, sealapi
from fedtune.crypto.context import CkksContext
from fedtune.crypto.seal_format import (
    _HEADER,
    COMPR_NONE,
    CiphertextLayout,
    parse_ciphertext,
)

__all__ = [
    "Poly",
    "add",
    "decode_plaintext",
    "from_ntt",
    "lagrange_at_zero",
    "mul",
    "shamir_shares",
    "smudging_noise",
    "to_ntt",
    "uniform",
]

Poly = NDArray[np.uint64]
_META = struct.Struct("<4QBQQQdQ")  # as seal_format._META, with the NTT flag free
_U64 = struct.Struct("<Q")
_PLAIN_META = struct.Struct("<4QQd")  # Plaintext::save: parms_id, coeff_count, scale


def _primes(layout: CiphertextLayout) -> NDArray[np.uint64]:
    return np.array(layout.primes, dtype=np.uint64)[:, None]


def add(layout: CiphertextLayout, *polys: Poly) -> Poly:
    """``sum(polys) mod q_i``, row by row (each term below its prime)."""
    primes = _primes(layout)
    acc = polys[0].astype(np.uint64, copy=True)
    for p in polys[1:]:
        acc += p  # both below q < 2^61: no overflow
        np.subtract(acc, primes, out=acc, where=acc >= primes)
    return acc


def mul(layout: CiphertextLayout, a: Poly, b: Poly) -> Poly:
    """Coefficient-wise ``a b mod q_i`` (a product of polynomials in NTT form), exact."""
    out = np.empty_like(a, dtype=np.uint64)
    for i, q in enumerate(layout.primes):
        prod = (a[i].astype(object) * b[i].astype(object)) % q
        out[i] = prod.astype(np.uint64)
    return out


def scale(layout: CiphertextLayout, a: Poly, factors: Sequence[int]) -> Poly:
    """``a * factors[i] mod q_i`` (a constant per prime)."""
    out = np.empty_like(a, dtype=np.uint64)
    for i, q in enumerate(layout.primes):
        out[i] = ((a[i].astype(object) * (int(factors[i]) % q)) % q).astype(np.uint64)
    return out


def uniform(layout: CiphertextLayout, *, rng: Any = None) -> Poly:
    """A polynomial uniform modulo each prime, from the OS CSPRNG (rejection sampling).

    ``rng``: a ``numpy.random.Generator`` for reproducible *tests* only.
    """
    n = layout.poly_modulus_degree
    out = np.empty((len(layout.primes), n), dtype=np.uint64)
    for i, q in enumerate(layout.primes):
        bits = int(q - 1).bit_length()
        mask = np.uint64((1 << bits) - 1)
        filled = 0
        while filled < n:
            need = 2 * (n - filled) + 8
            if rng is None:
                words = np.frombuffer(os.urandom(8 * need), dtype="<u8").copy()
            else:
                words = rng.integers(0, 2**64, size=need, dtype=np.uint64)
            words &= mask
            words = words[words < np.uint64(q)][: n - filled]
            out[i, filled : filled + words.size] = words
            filled += words.size
    return out


def smudging_noise(layout: CiphertextLayout, *, bits: int, count: int) -> NDArray[np.object_]:
    """``count`` polynomials of coefficients uniform on ``[-2^(bits-1), 2^(bits-1))``.

    Exactly uniform integers from the OS CSPRNG, as Python ints (``object`` array of
    shape ``(count, N)``), before reduction modulo the primes.
    """
    n = layout.poly_modulus_degree * count
    words = (bits + 63) // 64
    raw = np.frombuffer(os.urandom(8 * words * n), dtype="<u8").reshape(n, words)
    value = np.zeros(n, dtype=object)
    for w in range(words):
        value = value * (1 << 64) + raw[:, w].astype(object)
    # keep exactly `bits` bits: the top word's high bits masked off
    value = value % (1 << bits) - (1 << (bits - 1))
    return value.reshape(count, layout.poly_modulus_degree)


def _rns(layout: CiphertextLayout, values: NDArray[np.object_]) -> Poly:
    """Integers (``object``, shape ``(N,)``) as residues ``(L, N)``."""
    return np.stack([(values % q).astype(np.uint64) for q in layout.primes])


def _non_ntt_bytes(layout: CiphertextLayout, polys: Poly, *, ntt: bool) -> bytes:
    """A SEAL ``Ciphertext::save`` of two polynomials ``(2, L, N)``, NTT flag as given."""
    n, lvl = layout.poly_modulus_degree, len(layout.primes)
    count = 2 * n * lvl
    members = b"".join(
        [
            _META.pack(*layout.parms_id, int(ntt), 2, n, lvl, layout.scale, 1),
            layout.header(compr_mode=COMPR_NONE, size=_HEADER.size + 8 + 8 * count),
            _U64.pack(count),
            np.ascontiguousarray(polys, dtype="<u8").tobytes(),
        ]
    )
    return layout.header(compr_mode=COMPR_NONE, size=_HEADER.size + len(members)) + members


def _transform(ctx: CkksContext, polys: Poly, *, forward: bool) -> Poly:
    """SEAL's NTT (``forward``) or inverse NTT of two polynomials ``(2, L, N)``."""
    layout = ctx.layout
    sa = sealapi()
    ct = sa.Ciphertext()
    with scratch_dir() as tmp:
        seal_load(
            lambda p: ct.load(ctx._seal_context, p),
            _non_ntt_bytes(layout, polys, ntt=not forward),
            tmp,
        )
        if forward:
            ctx._evaluator.transform_to_ntt_inplace(ct)
        else:
            ctx._evaluator.transform_from_ntt_inplace(ct)
        out = seal_dump(ct.save, tmp)
    if forward:
        return parse_ciphertext(out, layout, field="ntt", seeded=False).data.copy()
    # parse_ciphertext insists on the NTT flag; read the coefficients directly.
    n, lvl = layout.poly_modulus_degree, len(layout.primes)
    from fedtune.crypto.seal_format import _unzstd  # noqa: PLC0415

    body = out[_HEADER.size :]
    if _HEADER.unpack_from(out)[4] != COMPR_NONE:
        body = _unzstd(body, limit=layout.members_size(seeded=False), field="intt")
    offset = _META.size + _HEADER.size + _U64.size
    return np.frombuffer(body, dtype="<u8", count=2 * n * lvl, offset=offset).reshape(2, lvl, n)


def to_ntt(ctx: CkksContext, polys: Poly) -> Poly:
    """NTT form of polynomials given by residues ``(k, L, N)`` (pairs go through SEAL)."""
    out = np.empty_like(polys, dtype=np.uint64)
    k = polys.shape[0]
    for start in range(0, k, 2):
        pair = polys[start : start + 2]
        if pair.shape[0] == 1:
            pair = np.concatenate([pair, pair])
        out[start : start + 2] = _transform(ctx, pair, forward=True)[: min(2, k - start)]
    return out


def from_ntt(ctx: CkksContext, polys: Poly) -> Poly:
    """Inverse of :func:`to_ntt` (coefficient form, residues)."""
    out = np.empty_like(polys, dtype=np.uint64)
    k = polys.shape[0]
    for start in range(0, k, 2):
        pair = polys[start : start + 2]
        if pair.shape[0] == 1:
            pair = np.concatenate([pair, pair])
        out[start : start + 2] = _transform(ctx, pair, forward=False)[: min(2, k - start)]
    return out


def smudging_ntt(ctx: CkksContext, *, bits: int, count: int) -> Poly:
    """``count`` smudging polynomials (:func:`smudging_noise`) in NTT form, ``(count, L, N)``."""
    noise = smudging_noise(ctx.layout, bits=bits, count=count)
    residues = np.stack([_rns(ctx.layout, row) for row in noise])
    return to_ntt(ctx, residues)


def decode_plaintext(ctx: CkksContext, poly: Poly) -> NDArray[np.float64]:
    """CKKS-decode a plaintext polynomial in NTT form: ``N`` reals (re, im of each slot).

    The numbers go to SEAL as a ``Plaintext`` serialisation written here (data-level
    ``parms_id``, so NTT form; the run's scale), and SEAL's ``CKKSEncoder`` decodes.
    """
    layout = ctx.layout
    count = poly.size
    members = b"".join(
        [
            _PLAIN_META.pack(*layout.parms_id, count, layout.scale),
            layout.header(compr_mode=COMPR_NONE, size=_HEADER.size + 8 + 8 * count),
            _U64.pack(count),
            np.ascontiguousarray(poly, dtype="<u8").tobytes(),
        ]
    )
    data = layout.header(compr_mode=COMPR_NONE, size=_HEADER.size + len(members)) + members
    sa = sealapi()
    plain = sa.Plaintext()
    with scratch_dir() as tmp:
        seal_load(lambda p: plain.load(ctx._seal_context, p), data, tmp)
    slots = np.asarray(ctx._encoder.decode_complex(plain), dtype=np.complex128)
    out = np.empty(2 * slots.size, dtype=np.float64)
    out[0::2] = slots.real
    out[1::2] = slots.imag
    return out


def shamir_shares(
    layout: CiphertextLayout, secret: Poly, *, xs: Sequence[int], threshold: int
) -> list[Poly]:
    """Shamir shares ``f(x)`` of ``secret = f(0)``, ``deg f = threshold - 1``, per prime.

    Each residue ring ``Z_{q_i}`` is a field (``q_i`` prime), so this is Shamir (1979)
    coefficient-wise; any ``threshold`` shares give ``secret`` back, fewer give nothing.
    """
    coeffs = [secret] + [uniform(layout) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        acc = coeffs[-1].copy()
        for c in reversed(coeffs[:-1]):  # Horner
            acc = add(layout, scale(layout, acc, [x] * len(layout.primes)), c)
        shares.append(acc)
    return shares


def lagrange_at_zero(layout: CiphertextLayout, x: int, quorum: Sequence[int]) -> list[int]:
    """Lagrange coefficient of ``x`` for interpolating at 0 from ``quorum``, mod each prime."""
    out = []
    for q in layout.primes:
        num, den = 1, 1
        for other in quorum:
            if other != x:
                num = num * (-other) % q
                den = den * (x - other) % q
        out.append(num * pow(den, -1, q) % q)
    return out
