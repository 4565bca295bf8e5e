"""Exact uniform integers from a keystream and exact Bernoulli(exp(-γ)) draws.

The primitives both discrete Gaussian samplers use: the scalar one
(:mod:`fedtune.privacy.discrete`) and the vectorised one
(:mod:`fedtune.privacy.discrete_array`, which finishes rare lanes with
:func:`bernoulli_exp_ratio`). Canonne, Kamath & Steinke, "The Discrete Gaussian for
Differential Privacy", NeurIPS 2020 (https://arxiv.org/abs/2004.00010), Algorithms 1, 2.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np

from fedtune.privacy._checks import check_positive_int
from fedtune.privacy.noise import ChaChaNoise

__all__ = [
    "KeystreamRandom",
    "bernoulli_exp",
    "bernoulli_exp_ratio",
    "bernoulli_exp_unit",
    "discrete_gaussian",
    "discrete_laplace",
    "discrete_laplace_unchecked",
]


class KeystreamRandom(random.Random):
    """Uniform integers from a :class:`~fedtune.privacy.noise.ChaChaNoise` keystream.

    ``randrange`` draws from :meth:`getrandbits` by rejection, so it is exactly uniform;
    the bits are the source's ChaCha20 keystream (a fresh nonce per 128 KiB), so a
    :class:`~fedtune.privacy.noise.CsprngNoise` gives CSPRNG integers and a
    :class:`~fedtune.privacy.noise.SeededNoise` reproducible ones. 3x faster than
    :class:`random.SystemRandom`, which asks the OS for every draw.
    """

    _BUFFER_WORDS = 1 << 14  # 64-bit words per keystream request

    def __init__(self, source: ChaChaNoise) -> None:
        self._source = source
        self._words: list[int] = []
        self._pos = 0
        super().__init__()

    def seed(self, *args: object, **kwargs: object) -> None:
        """Nothing: the key of the source is the seed."""

    def getstate(self) -> tuple[int, ...]:  # a state would be the keystream
        raise NotImplementedError("a KeystreamRandom has no state to save.")

    def setstate(self, state: object) -> None:
        raise NotImplementedError("a KeystreamRandom has no state to restore.")

    def getrandbits(self, k: int) -> int:
        """``k`` uniform bits of the keystream as an integer (whole 32-bit words each)."""
        if k <= 0:
            if k < 0:
                raise ValueError(f"`k` must be >= 0, got {k}.")
            return 0
        n = (k + 31) >> 5
        pos = self._pos
        if pos + n > len(self._words):
            fresh = self._source._words(max(self._BUFFER_WORDS, n)).view(np.uint32).tolist()
            self._words = self._words[pos:] + fresh
            pos = 0
        self._pos = pos + n
        if n == 1:
            return int(self._words[pos] >> (32 - k))
        value = 0
        for word in self._words[pos : pos + n]:
            value = (value << 32) | word
        return value >> (32 * n - k)

    def random(self) -> float:
        """A uniform float in [0, 1) from 53 keystream bits."""
        return self.getrandbits(53) * 2.0**-53


def bernoulli_exp(gamma: Fraction, rng: random.Random) -> bool:
    """Bernoulli(exp(-gamma)) for a rational ``gamma >= 0``, exactly (CKS Algorithms 1, 2).

    For ``gamma`` in [0, 1]: draw Bernoulli(gamma / k) for k = 1, 2, ... until one is 0;
    the result is 1 iff that happened at an odd k. Above 1: ``floor(gamma)`` draws of
    Bernoulli(exp(-1)) and one of Bernoulli(exp(-(gamma - floor(gamma)))), all 1.
    """
    if gamma < 0:
        raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
    return bernoulli_exp_ratio(gamma.numerator, gamma.denominator, rng)


def bernoulli_exp_ratio(num: int, den: int, rng: random.Random) -> bool:
    """Bernoulli(exp(-num / den)) for integers ``num >= 0``, ``den > 0`` (no Fractions:
    this is the sampler's inner loop)."""
    while num > den:
        if not bernoulli_exp_unit(1, 1, rng):
            return False
        num -= den
    return bernoulli_exp_unit(num, den, rng)


def bernoulli_exp_unit(num: int, den: int, rng: random.Random) -> bool:
    """Bernoulli(exp(-num / den)) for ``0 <= num <= den`` (CKS Algorithm 1): draw
    Bernoulli(num / (den k)), i.e. ``U < num`` for ``U`` uniform in ``[0, den k)``."""
    k = 1
    while rng.randrange(den * k) < num:
        k += 1
    return k % 2 == 1


def discrete_laplace(t: int, rng: random.Random) -> int:
    """One sample of the discrete Laplace ``P[Y = y] ∝ exp(-|y| / t)`` (CKS Algorithm 2)."""
    t = check_positive_int("t", t)
    return discrete_laplace_unchecked(t, rng)


def discrete_laplace_unchecked(t: int, rng: random.Random) -> int:
    while True:
        u = rng.randrange(t)
        if not bernoulli_exp_unit(u, t, rng):
            continue
        v = 0
        while bernoulli_exp_unit(1, 1, rng):
            v += 1
        x = u + t * v
        negative = rng.randrange(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def discrete_gaussian(sigma2: Fraction, rng: random.Random) -> int:
    """One sample of ``N_Z(0, sigma2)`` for a rational ``sigma2 > 0`` (CKS Algorithm 3).

    A discrete Laplace proposal of scale ``t = floor(sigma) + 1`` accepted with
    probability ``exp(-(|y| - sigma2 / t)^2 / (2 sigma2))``; expected proposals < 2.
    With ``sigma2 = a / b`` that exponent is ``(|y| b t - a)^2 / (2 a b t^2)``.
    """
    if sigma2 <= 0:
        raise ValueError(f"`sigma2` must be > 0, got {sigma2}.")
    a, b = sigma2.numerator, sigma2.denominator
    t = math.isqrt(a // b) + 1
    den = 2 * a * b * t * t
    while True:
        y = discrete_laplace_unchecked(t, rng)
        if bernoulli_exp_ratio((abs(y) * b * t - a) ** 2, den, rng):
            return y
