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
    unzstd,
)

__all__ = [
    "Poly",
    "add",
    "decode_plaintext",
    "from_ntt",
    "lagrange_at_zero",
    "mul",
    "shamir_shares",
    "crt_compose",
    "mul_shoup",
    "pack_partial",
    "rounding",
    "unpack_partial",
    "shoup",
    "smudging_residues",
    "smudging_ntt",
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
    """Coefficient-wise ``a b mod q_i`` (a product of polynomials in NTT form), exact.

    On Python integers: the reference for :func:`mul_shoup`, which the protocol uses.
    """
    out = np.empty_like(a, dtype=np.uint64)
    for i, q in enumerate(layout.primes):
        prod = (a[i].astype(object) * b[i].astype(object)) % q
        out[i] = prod.astype(np.uint64)
    return out


_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


def _mulhi(a: NDArray[np.uint64], b: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """High 64 bits of the 128-bit products ``a b`` (schoolbook on 32-bit halves)."""
    a0, a1 = a & _M32, a >> _S32
    b0, b1 = b & _M32, b >> _S32
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> _S32) + (p01 & _M32) + (p10 & _M32)  # < 3 * 2^32: no overflow
    return p11 + (p01 >> _S32) + (p10 >> _S32) + (mid >> _S32)  # type: ignore[no-any-return]


def shoup(layout: CiphertextLayout, w: Poly) -> Poly:
    """``floor(w 2^64 / q_i)``: the precomputation of :func:`mul_shoup` for a fixed ``w``."""
    out = np.empty_like(w, dtype=np.uint64)
    for i, q in enumerate(layout.primes):
        out[i] = ((w[i].astype(object) << 64) // q).astype(np.uint64)
    return out


def mul_shoup(layout: CiphertextLayout, a: Poly, w: Poly, w_shoup: Poly) -> Poly:
    """``a w mod q_i`` in uint64 (Shoup's modular multiplication, as in SEAL's NTT).

    With ``w < q < 2^63`` and ``w' = floor(w 2^64 / q)``, ``a w - floor(a w' / 2^64) q``
    lies in ``[0, 2q)`` and is computed exactly modulo ``2^64``; one conditional subtract.
    """
    primes = _primes(layout)
    r = a * w - _mulhi(a, w_shoup) * primes  # wrapping uint64 arithmetic, exact mod 2^64
    np.subtract(r, primes, out=r, where=r >= primes)
    return r  # type: ignore[no-any-return]


def scale(layout: CiphertextLayout, a: Poly, factors: Sequence[int]) -> Poly:
    """``a * factors[i] mod q_i`` (a constant per prime)."""
    w = np.array([int(f) % q for f, q in zip(factors, layout.primes, strict=True)], np.uint64)
    w = w[:, None]
    return mul_shoup(layout, a, w, shoup(layout, w))


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


def smudging_residues(layout: CiphertextLayout, *, bits: int, count: int) -> Poly:
    """``count`` polynomials, coefficients uniform on ``[-2^(bits-1), 2^(bits-1))``, as residues.

    Each coefficient is ``v = h 2^64 + l - 2^(bits-1)`` with ``l`` a 64-bit word and ``h`` the
    top ``bits - 64`` bits of another, both from the OS CSPRNG: exactly uniform. Returned
    modulo each prime, ``(count, L, N)``, in coefficient form (``64 < bits <= 128``).
    """
    if not 64 < bits <= 128:
        raise ValueError(f"`bits` should lie in (64, 128], got {bits}.")
    shape = (count, layout.poly_modulus_degree)
    raw = np.frombuffer(os.urandom(16 * count * shape[1]), dtype="<u8").reshape(2, *shape)
    hi = raw[0] >> np.uint64(128 - bits)
    lo = raw[1]
    out = np.empty((count, len(layout.primes), shape[1]), dtype=np.uint64)
    for i, q in enumerate(layout.primes):
        qq = np.uint64(q)
        one = layout.__class__(layout.version, layout.parms_id, shape[1], (q,), layout.scale)
        c = np.array([[(1 << 64) % q]], dtype=np.uint64)
        part = mul_shoup(one, hi, c, shoup(one, c)) + lo % qq  # both < q: no overflow
        part = np.where(part >= qq, part - qq, part)
        offset = np.uint64((-(1 << (bits - 1))) % q)
        part = part + offset
        out[:, i] = np.where(part >= qq, part - qq, part)
    return out


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

    body = out[_HEADER.size :]
    if _HEADER.unpack_from(out)[4] != COMPR_NONE:
        body = unzstd(body, limit=layout.members_size(seeded=False), field="intt")
    offset = _META.size + _HEADER.size + _U64.size
    return np.frombuffer(body, dtype="<u8", count=2 * n * lvl, offset=offset).reshape(2, lvl, n)


def to_ntt(ctx: CkksContext, polys: Poly) -> Poly:
    """NTT form of polynomials given by residues ``(k, L, N)`` (pairs go through SEAL)."""
    return _transform_all(ctx, polys, forward=True)


def from_ntt(ctx: CkksContext, polys: Poly) -> Poly:
    """Inverse of :func:`to_ntt` (coefficient form, residues)."""
    return _transform_all(ctx, polys, forward=False)


def _transform_all(ctx: CkksContext, polys: Poly, *, forward: bool) -> Poly:
    """:func:`_transform` over ``k`` polynomials, two at a time (a lone last one doubled)."""
    out = np.empty_like(polys, dtype=np.uint64)
    k = polys.shape[0]
    for start in range(0, k, 2):
        pair = polys[start : start + 2]
        if pair.shape[0] == 1:
            pair = np.concatenate([pair, pair])
        out[start : start + 2] = _transform(ctx, pair, forward=forward)[: min(2, k - start)]
    return out


def smudging_ntt(ctx: CkksContext, *, bits: int, count: int) -> Poly:
    """``count`` smudging polynomials (:func:`smudging_residues`) in NTT form, ``(count, L, N)``."""
    return to_ntt(ctx, smudging_residues(ctx.layout, bits=bits, count=count))


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


def _modulus(layout: CiphertextLayout) -> int:
    out = 1
    for q in layout.primes:
        out *= q
    return out


def crt_compose(layout: CiphertextLayout, residues: Poly) -> NDArray[np.object_]:
    """The integers in ``[0, Q)`` with these residues (``Q`` the product of the primes)."""
    big_q = _modulus(layout)
    acc = np.zeros(residues.shape[1], dtype=object)
    for i, q in enumerate(layout.primes):
        rest = big_q // q
        acc = acc + residues[i].astype(object) * (rest * pow(rest, -1, q))
    return acc % big_q  # type: ignore[no-any-return]


def rounding(layout: CiphertextLayout, *, smudging_bits: int) -> tuple[int, int]:
    """``(r, width)``: a partial decryption drops its ``r`` low bits and keeps ``width`` bytes.

    The low ``r`` bits of a coefficient are far below the smudging noise (``r`` is 8 bits
    under its width), so a key holder rounds them off before sending: about 7 of the 16
    bytes per coefficient. Rounding is the sender's own post-processing: it changes nothing
    in the smudging argument, and adds at most ``2^(r-1)`` to each coefficient.
    """
    top = _modulus(layout).bit_length()
    width = (top - (smudging_bits - 8) + 1 + 7) // 8
    return top + 1 - 8 * width, width


def pack_partial(ctx: CkksContext, d: Poly, *, smudging_bits: int) -> bytes:
    """A partial decryption ``d`` (NTT form) as ``N`` rounded coefficients of ``width`` bytes."""
    layout = ctx.layout
    r, width = rounding(layout, smudging_bits=smudging_bits)
    coeffs = from_ntt(ctx, d[None])[0]
    limit = -(-_modulus(layout) >> r)  # ceil(Q / 2^r)
    if len(layout.primes) == 2 and r >= 65:
        v = _round_two_primes(layout, coeffs, r) % np.uint64(limit)
    else:
        x = crt_compose(layout, coeffs)
        v = (((x + (1 << (r - 1))) >> r) % limit).astype(np.uint64)
    words = v.astype("<u8").view(np.uint8).reshape(-1, 8)
    return bytes(np.ascontiguousarray(words[:, :width]).tobytes())


def unpack_partial(ctx: CkksContext, data: bytes, *, smudging_bits: int) -> Poly:
    """Inverse of :func:`pack_partial` up to the rounding (NTT form, residues).

    Raises ``ValueError`` on a wrong size or a value beyond ``ceil(Q / 2^r)``.
    """
    layout = ctx.layout
    r, width = rounding(layout, smudging_bits=smudging_bits)
    n = layout.poly_modulus_degree
    if len(data) != n * width:
        raise ValueError(f"a packed partial decryption is {n * width} bytes, got {len(data)}.")
    padded = np.zeros((n, 8), dtype=np.uint8)
    padded[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(n, width)
    v = padded.view("<u8").reshape(n)
    limit = -(-_modulus(layout) >> r)
    if (v >= np.uint64(limit)).any():
        raise ValueError("a packed partial decryption holds a value out of range.")
    residues = np.empty((len(layout.primes), n), dtype=np.uint64)
    for i, q in enumerate(layout.primes):  # v 2^r mod q_i, v < 2^56 < q_i
        one = _single(layout, q)
        c = np.array([[pow(2, r, q)]], dtype=np.uint64)
        residues[i] = mul_shoup(one, v[None, :], c, shoup(one, c))[0]
    return to_ntt(ctx, residues[None])[0]


def _single(layout: CiphertextLayout, q: int) -> CiphertextLayout:
    return CiphertextLayout(layout.version, layout.parms_id, layout.poly_modulus_degree, (q,), 1.0)


def _round_two_primes(layout: CiphertextLayout, res: Poly, r: int) -> NDArray[np.uint64]:
    """``floor((x + 2^(r-1)) / 2^r)`` of the CRT integers ``x`` of two residues, in uint64.

    Garner: ``x = r0 + q0 k`` with ``k = (r1 - r0) q0^-1 mod q1``; ``q0 k`` as two 64-bit
    halves. Needs ``r >= 65`` (the rounding constant ``2^(r-1)`` adds to the high word).
    """
    q0, q1 = layout.primes
    one = _single(layout, q1)
    r0, r1 = res[0], res[1]
    qq1 = np.uint64(q1)
    diff = r1 + (qq1 - (r0 % qq1))  # (r1 - r0) mod q1, before one subtract
    diff = np.where(diff >= qq1, diff - qq1, diff)
    inv = np.array([[pow(q0, -1, q1)]], dtype=np.uint64)
    k = mul_shoup(one, diff[None, :], inv, shoup(one, inv))[0]
    q0a = np.full_like(k, q0)
    lo = q0a * k
    hi = _mulhi(q0a, k)
    lo2 = lo + r0
    hi = hi + (lo2 < lo).astype(np.uint64)  # carry
    hi = hi + np.uint64(1 << (r - 1 - 64))  # + 2^(r-1)
    return hi >> np.uint64(r - 64)  # type: ignore[no-any-return]
