"""The exact discrete Gaussian, vectorised: many samples at once in numpy integer arithmetic.

The same algorithm as :func:`fedtune.privacy.discrete.discrete_gaussian` (Canonne, Kamath
& Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
https://arxiv.org/abs/2004.00010, Algorithms 1--3), run on arrays: every rejection loop
runs over the mask of its still-unfinished lanes, so a lane's output is the same law as
one scalar run, and the lanes are independent (each draws its own uniform integers).

Only exact integer operations touch the randomness:

* a uniform integer in ``[0, m)`` is a 64-bit keystream word's top ``bitlen(m - 1)`` bits,
  redrawn while ``>= m`` (scalar ``m < 2^62``), or Lemire's multiply-and-reject on 32 bits
  for the per-lane ``k < 2^32`` of Algorithm 1 (Lemire, ACM TOMACS 2019): both exactly
  uniform;
* Bernoulli(``r / (D k)``) of Algorithm 1 is Bernoulli(``r / D``) and independent
  Bernoulli(``1 / k``): the same law with the moduli kept at ``D`` and ``k`` (no product
  ``D k`` that could overflow);
* Bernoulli(``exp(-γ)``) for ``γ = N / D > 1`` is ``floor(γ)`` draws of Bernoulli(``e^-1``)
  and one of Bernoulli(``exp(-(N mod D) / D)``), all true (Algorithm 2's reduction).

With ``s^2 = a / b`` and ``t = floor(s) + 1`` the acceptance exponent of Algorithm 3 is
``(|y| b t - a)^2 / (2 a b t^2)``: its denominator must be ``< 2^62`` (checked, with a
clear error: pass ``s^2`` as an integer, ``b = 1``, to reach the largest scales, about
``s < 38,000``). The numerator ``c^2``, ``c = |y| b t - a``, is formed in uint64 while
``|c| < 2^32``; a lane beyond (``|y|`` above about ``(2^32 + a) / (b t)``, near ``5 s``
at the largest scales, under 1% of proposals) is finished by the scalar sampler on
Python integers, from the same keystream: exact either way.

The bits are the keystream of a :class:`~fedtune.privacy.discrete_bits.KeystreamRandom`
(ChaCha20 under the :class:`~fedtune.privacy.noise.ChaChaNoise` key): a
:class:`~fedtune.privacy.noise.SeededNoise` gives reproducible samples. Not bit-identical
to the scalar sampler (the bits are consumed in another order); the same distribution
(tested against the exact pmf and against the scalar sampler).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

from fedtune.privacy.discrete_bits import KeystreamRandom, discrete_gaussian
from fedtune.privacy.discrete_bits import bernoulli_exp_ratio as _scalar_bernoulli_exp
from fedtune.privacy.discrete_bits import bernoulli_exp_unit as _scalar_bernoulli_exp_unit
from fedtune.privacy.discrete_bits import discrete_laplace_unchecked as _scalar_laplace

__all__ = [
    "MAX_MODULUS",
    "discrete_gaussian_array",
    "fits_vectorised",
    "max_vectorised_scale",
]

#: Every modulus and every numerator compared against a uniform integer stays below this.
MAX_MODULUS = 1 << 62
#: A rejection loop with at most this many unfinished lanes finishes them one by one with
#: the scalar sampler (same law, Python integers, same keystream): a loop's last rounds
#: run on a handful of lanes, where numpy's per-call overhead is the whole cost.
_TAIL = 16
_U64 = np.uint64
_TWO32 = np.uint64(1 << 32)
_LOW32 = np.uint64((1 << 32) - 1)


class _Words:
    """64-bit words of a :class:`KeystreamRandom`'s source, in blocks (fresh nonces)."""

    _BLOCK = 1 << 15

    def __init__(self, rng: KeystreamRandom) -> None:
        self._rng = rng
        self._buf: NDArray[np.uint64] = np.empty(0, dtype=np.uint64)
        self._pos = 0

    def take(self, n: int) -> NDArray[np.uint64]:
        if self._pos + n > len(self._buf):
            fresh = self._rng._source._words(max(self._BLOCK, n))
            self._buf = np.concatenate([self._buf[self._pos :], fresh])
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out


def _uniform_below(modulus: int, n: int, words: _Words) -> NDArray[np.int64]:
    """``n`` uniform integers in ``[0, modulus)`` for one ``modulus < 2^62``: rejection
    (each candidate is accepted with odds above 1/2; a lane takes its first accepted one)."""
    if modulus == 1:
        return np.zeros(n, dtype=np.int64)
    shift = _U64(64 - (modulus - 1).bit_length())
    out = (words.take(n) >> shift).astype(np.int64)  # < 2^62: exact
    todo = np.flatnonzero(out >= modulus)
    while todo.size:  # the rejected lanes: 8 candidates each, the first one below wins
        u = (words.take(8 * todo.size) >> shift).astype(np.int64).reshape(todo.size, 8)
        ok = u < modulus
        first = ok.argmax(axis=1)
        hit = ok[np.arange(todo.size), first]
        out[todo[hit]] = u[np.flatnonzero(hit), first[hit]]
        todo = todo[~hit]
    return out


def _one_in(k: NDArray[np.int64], words: _Words) -> NDArray[np.bool_]:
    """Bernoulli(``1 / k``) per lane for ``1 <= k < 2^32``: ``U == 0``, ``U`` uniform in
    ``[0, k)`` by Lemire's method (32-bit word ``w``, ``m = w k``, reject the low half
    below ``2^32 mod k``; the result is ``m >> 32``)."""
    if k.size and int(k.max()) >= 1 << 32:
        raise RuntimeError("Bernoulli(1/k) lane counter reached 2^32 (odds below 1/2^32!).")
    ku = k.astype(np.uint64)
    threshold = (_TWO32 - ku) % ku  # 2^32 mod k
    out = np.empty(k.size, dtype=np.bool_)
    todo = np.arange(k.size)
    while todo.size:
        w = words.take(todo.size) >> _U64(32)
        m = w * ku[todo]  # < 2^64
        ok = (m & _LOW32) >= threshold[todo]
        out[todo[ok]] = (m[ok] >> _U64(32)) == 0
        todo = todo[~ok]
    return out


def _bernoulli_exp_unit(r: NDArray[np.int64], den: int, words: _Words) -> NDArray[np.bool_]:
    """Bernoulli(``exp(-r / den)``) per lane, ``0 <= r <= den < 2^62`` (CKS Algorithm 1):
    ``k = 1, 2, ...`` while Bernoulli(``r / (den k)``) is 1; true iff it stopped at odd k."""
    k = np.ones(r.size, dtype=np.int64)
    live = np.arange(r.size)
    while live.size:
        if live.size <= _TAIL:  # the same continuation, lane by lane
            rng = words._rng
            for j in live:
                kj, rj = int(k[j]), int(r[j])
                while rng.randrange(den) < rj and (kj == 1 or rng.randrange(kj) == 0):
                    kj += 1
                k[j] = kj
            break
        go = _uniform_below(den, live.size, words) < r[live]
        kl = k[live]
        more = kl > 1
        if more.any():
            go[more] &= _one_in(kl[more], words)
        k[live[go]] += 1
        live = live[go]
    return (k & 1) == 1


def _bernoulli_exp(
    whole: NDArray[np.int64], rest: NDArray[np.int64], den: int, words: _Words
) -> NDArray[np.bool_]:
    """Bernoulli(``exp(-(whole + rest / den))``) per lane, ``0 <= rest < den < 2^62``."""
    out = np.ones(whole.size, dtype=np.bool_)
    live = np.flatnonzero(whole > 0)
    ones = np.ones(1, dtype=np.int64)
    done = 0
    while live.size:  # Bernoulli(e^-1) once per whole unit, until one fails
        out[live] = _bernoulli_exp_unit(np.broadcast_to(ones, live.size), 1, words)
        done += 1
        live = live[out[live] & (whole[live] > done)]
    live = np.flatnonzero(out)
    out[live] = _bernoulli_exp_unit(rest[live], den, words)
    return out


def _laplace(t: int, n: int, words: _Words) -> NDArray[np.int64]:
    """``n`` discrete Laplace samples of scale ``t`` (CKS Algorithm 2), ``t < 2^31``."""
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    one = np.ones(1, dtype=np.int64)
    while todo.size:
        if todo.size <= _TAIL:  # a rejected lane restarts from scratch: one scalar draw
            for j in todo:
                out[j] = _scalar_laplace(t, words._rng)
            break
        u = _uniform_below(t, todo.size, words)
        keep = _bernoulli_exp_unit(u, t, words)
        todo_k, u = todo[keep], u[keep]
        v = np.zeros(todo_k.size, dtype=np.int64)
        live = np.arange(todo_k.size)
        while live.size:  # geometric: v += 1 while Bernoulli(e^-1)
            if live.size <= _TAIL:
                for j in live:
                    while _scalar_bernoulli_exp_unit(1, 1, words._rng):
                        v[j] += 1
                break
            go = _bernoulli_exp_unit(np.broadcast_to(one, live.size), 1, words)
            live = live[go]
            v[live] += 1
        x = u + t * v
        negative = (words.take(todo_k.size) >> _U64(63)) == 1
        ok = ~(negative & (x == 0))
        out[todo_k[ok]] = np.where(negative, -x, x)[ok]
        todo = np.concatenate([todo[~keep], todo_k[~ok]])
    return out


def max_vectorised_scale() -> int:
    """The largest integer ``s^2`` the vectorised sampler takes (``2 s^2 t^2 < 2^62``)."""
    lo, hi = 1, 1 << 32
    while lo < hi:
        mid = (lo + hi + 1) // 2
        t = math.isqrt(mid) + 1
        if 2 * mid * t * t < MAX_MODULUS:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _denominator(sigma2: Fraction) -> int:
    a, b = sigma2.numerator, sigma2.denominator
    t = math.isqrt(a // b) + 1
    return 2 * a * b * t * t


def fits_vectorised(sigma2: Fraction) -> bool:
    """Whether :func:`discrete_gaussian_array` takes ``sigma2`` (``2 a b t^2 < 2^62``)."""
    return Fraction(sigma2) > 0 and _denominator(Fraction(sigma2)) < MAX_MODULUS


def discrete_gaussian_array(sigma2: Fraction, n: int, rng: KeystreamRandom) -> NDArray[np.int64]:
    """``n`` independent samples of ``N_Z(0, sigma2)``, exactly (CKS Algorithm 3, vectorised).

    Parameters
    ----------
    sigma2
        The scale ``s^2 = a / b > 0``, rational. The acceptance denominator ``2 a b t^2``
        (``t = floor(s) + 1``) must be below ``2^62``: an integer ``s^2`` reaches
        ``s`` of about 38,000 (:func:`max_vectorised_scale`).
    n
        How many samples.
    rng
        The keystream; :class:`~fedtune.privacy.noise.SeededNoise` for reproducible runs.

    Raises
    ------
    ValueError
        If ``sigma2 <= 0``, ``n < 0``, or ``2 a b t^2 >= 2^62`` (the message says how to fix
        it).
    """
    sigma2 = Fraction(sigma2)
    if sigma2 <= 0:
        raise ValueError(f"`sigma2` must be > 0, got {sigma2}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be an int >= 0, got {n!r}.")
    a, b = sigma2.numerator, sigma2.denominator
    t = math.isqrt(a // b) + 1
    den = _denominator(sigma2)
    if den >= MAX_MODULUS:
        raise ValueError(
            f"`sigma2` = {sigma2} (s = {math.sqrt(a / b):.6g}) needs the denominator "
            f"2 a b t^2 = {den} >= 2^62 in the vectorised sampler; round `sigma2` up to an "
            f"integer (at most {max_vectorised_scale()}), or use discrete_gaussian (scalar)."
        )
    words = _Words(rng)
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    # |c| = | |y| b t - a | < 2^32 keeps c^2 < 2^64 (uint64): lanes beyond (|y| above about
    # 5 s) go to Python integers.
    if a >= 1 << 32:  # unreachable with den < 2^62, kept as the bound's proof
        raise ValueError(f"`sigma2` numerator {a} >= 2^32; round `sigma2` to an integer.")
    y_max = ((1 << 32) - 1 + a) // (b * t)
    den_u = np.uint64(den)
    while todo.size:
        if todo.size <= _TAIL:  # a rejected lane restarts from scratch: one scalar draw
            for j in todo:
                out[j] = discrete_gaussian(sigma2, rng)
            break
        y = _laplace(t, todo.size, words)
        ay = np.abs(y)
        small = ay <= y_max
        accept = np.zeros(todo.size, dtype=np.bool_)
        idx = np.flatnonzero(small)
        c = np.abs(ay[idx] * (b * t) - a).astype(np.uint64)  # < 2^32
        whole, rest = np.divmod(c * c, den_u)  # c^2 < 2^64: exact in uint64
        accept[idx] = _bernoulli_exp(whole.astype(np.int64), rest.astype(np.int64), den, words)
        for i in np.flatnonzero(~small):  # exact, rare: Python integers, same keystream
            accept[i] = _scalar_bernoulli_exp((int(ay[i]) * b * t - a) ** 2, den, rng)
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out
