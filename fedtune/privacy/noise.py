"""Gaussian noise for DP from a cryptographic keystream, safe against floating-point attacks.

Two weaknesses of noise drawn with ``torch.normal(generator=...)`` / ``np.random``:

* **Predictable bits.** Mersenne Twister and Philox are not cryptographic: a seed
  derived from public values (the simulation's run seed) or a few observed outputs
  give every later draw away, and then the noise can simply be subtracted.
* **Sparse floating-point support.** A Gaussian computed in floating point from one
  53-bit uniform can take only some of the floats near a value, and which ones depends
  on where it is. Mironov ("On Significance of the Least Significant Bits for
  Differential Privacy", CCS 2012) showed for Laplace noise that the output ``x + z``
  then reveals ``x``; Jin, McMurtry, Rubinstein and Ohrimenko ("Are We There Yet?
  Timing and Floating-Point Attacks on Differential Privacy Systems", IEEE S&P 2022,
  https://arxiv.org/abs/2112.05307) did the same for Opacus' Gaussian noise.

:class:`ChaChaNoise` answers both. Its bits are a ChaCha20 keystream (Bernstein 2008;
RFC 8439) under a 256-bit key; each 64-bit word gives a 53-bit uniform, pairs of
uniforms give two standard normals by Box--Muller (``r = sqrt(-2 ln u1)``,
``z = (r cos 2 pi u2, r sin 2 pi u2)``, all in float64), and every returned value is

    z = std * (g_1 + g_2 + g_3 + g_4) / 2,        g_i ~ N(0, 1) independent,

which is N(0, std^2), with the four ``g_i`` from four different Box--Muller pairs.
Summing ``2n`` Gaussians is the defence of Holohan and Braghin ("Secure Random
Sampling in Differential Privacy", ESORICS 2021,
https://arxiv.org/abs/2107.10138, section 5.1), with ``n = 2`` as in Opacus'
``secure_mode`` (``opacus/optimizers/optimizer.py``, ``_generate_noise``: four
``torch.normal`` draws summed and divided by 2). Why it resists the attack: to rule
out an input ``x`` from an output ``y`` the attacker must show that ``y - x`` is
*not* a value the sampler can produce. For one Box--Muller sample that set is small
enough to enumerate (about ``2^53`` candidates near any point); for the sum of ``2n``
samples it is the set of float sums of ``2n`` such values, ``2^(53(2n-1)) = 2^159``
candidates for ``n = 2``, dense among the floats near every ``y``, so no ``x`` can be
excluded. The sum is formed and scaled in float64 and rounded once to the requested
dtype (:func:`fedtune.privacy.dpsgd.make_dp_training` even adds it to the gradient
in float64 before rounding), so a float32 / bfloat16 output is a rounding of an
essentially continuous value: its low-order bits test uniform
(``tests/test_privacy_noise.py``). Limitation: the float64 sum itself is not uniform
in its last bit or two -- adding four float64 terms rounds half to even, and the
measured chi-square p-value of the lowest bit is 0 at 10^6 samples -- so float64
parameters get the guarantee of Opacus' ``secure_mode`` (the same sum), no more. A
discrete Gaussian on a fixed grid (Canonne, Kamath & Steinke, NeurIPS 2020,
https://arxiv.org/abs/2004.00010) would remove that too, at a much higher cost.

Two key sources, one method:

* :class:`CsprngNoise` (the default everywhere): a fresh key from the OS CSPRNG
  (:func:`secrets.token_bytes`), never stored, so the noise cannot be reproduced.
* :class:`SeededNoise`: the key is SHA-256 of a seed, so the noise is reproducible --
  for simulations and tests. Anyone who knows the seed knows the noise; never use it on
  real data with a seed that is not a secret (see the class).

Draw ``i`` of a source (``i = 0, 1, ...``) reads the keystream under nonce ``i`` from
block 0, so no (key, nonce) pair is ever reused and a :class:`SeededNoise` replays the
same values for the same sequence of calls. Nothing here touches global RNG state.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch

__all__ = ["ChaChaNoise", "CsprngNoise", "NoiseSource", "SeededNoise"]

#: ChaCha20's block counter is 32 bits: one nonce covers 2^32 blocks of 64 bytes.
_MAX_BYTES_PER_DRAW = (1 << 32) * 64
#: Four 64-bit words (four uniforms -> four normals) per output value.
_WORDS_PER_VALUE = 4
_MANTISSA = 53
_TWO_POW_M53 = 2.0**-_MANTISSA
_CHUNK_VALUES = 1 << 22  # keystream and float64 temporaries stay below ~200 MB per chunk


@runtime_checkable
class NoiseSource(Protocol):
    """Where DP noise comes from: i.i.d. ``N(0, std^2)`` values, as torch or numpy."""

    def normal(
        self,
        shape: Sequence[int],
        std: float,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A tensor of ``shape`` on ``device`` (default dtype float32)."""
        ...

    def normal_numpy(self, shape: Sequence[int], std: float) -> NDArray[np.float64]:
        """A float64 array of ``shape``."""
        ...


class ChaChaNoise:
    """Float-safe Gaussian noise from a ChaCha20 keystream under ``key`` (32 bytes).

    Use :class:`CsprngNoise` or :class:`SeededNoise`; this base class only fixes the
    method (see the module docstring). Safe to share between threads.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError(
                f"`key` must be 32 bytes (a ChaCha20 key), got {type(key).__name__} "
                f"of length {len(key) if isinstance(key, bytes) else 'n/a'}."
            )
        self._key = key
        self._draws = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(draws={self._draws})"

    def _words(self, count: int) -> NDArray[np.uint64]:
        """``count`` keystream words of the next draw (a fresh nonce each call)."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        nbytes = 8 * count
        if nbytes > _MAX_BYTES_PER_DRAW:
            raise ValueError(f"one draw is limited to {_MAX_BYTES_PER_DRAW} keystream bytes.")
        with self._lock:
            draw = self._draws
            self._draws += 1
        if draw >= 1 << 96:
            raise RuntimeError("this noise source has used up its 2^96 nonces; make a new one.")
        # RFC 8439 layout as OpenSSL takes it: 4-byte block counter (0), 12-byte nonce.
        nonce = bytes(4) + draw.to_bytes(12, "little")
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        out = bytearray(nbytes)
        view = memoryview(out)
        step = 1 << 24
        zeros = bytes(min(step, nbytes))
        for start in range(0, nbytes, step):
            stop = min(start + step, nbytes)
            encryptor.update_into(zeros[: stop - start], view[start:stop])
        return np.frombuffer(out, dtype="<u8").astype(np.uint64, copy=False)

    def normal_numpy(self, shape: Sequence[int], std: float) -> NDArray[np.float64]:
        """``N(0, std^2)`` values of ``shape`` as a float64 array."""
        dims, std = _check(shape, std)
        n = math.prod(dims)
        if std == 0.0 or n == 0:
            return np.zeros(dims, dtype=np.float64)
        out = self._standard_sums(n)
        out *= std / 2.0
        return out.reshape(dims)

    def normal(
        self,
        shape: Sequence[int],
        std: float,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``N(0, std^2)`` values of ``shape`` on ``device`` in ``dtype`` (default float32).

        The keystream is made on the CPU; the Box--Muller arithmetic runs in float64, on
        the GPU for a CUDA ``device`` and otherwise with numpy on the CPU (one thread:
        torch's multi-threaded kernels measured 50x slower than numpy when simulated
        clients oversubscribe the cores), and the result is rounded once to ``dtype``.
        On the CPU the values are exactly :meth:`normal_numpy`'s.
        """
        import torch

        dims, std = _check(shape, std)
        dtype = torch.float32 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating-point dtype, got {dtype}.")
        device = torch.device(device)
        n = math.prod(dims)
        if std == 0.0 or n == 0:
            return torch.zeros(dims, device=device, dtype=dtype)
        if device.type != "cuda":
            values = torch.from_numpy(self.normal_numpy(dims, std))
            return values.to(device=device, dtype=dtype)
        parts = []
        for lo in range(0, n, _CHUNK_VALUES):
            m = max(min(lo + _CHUNK_VALUES, n) - lo, 2)  # see _standard_sums
            words = torch.from_numpy(self._words(_WORDS_PER_VALUE * m).view(np.int64))
            parts.append(_sum_of_four_torch(words.to(device))[: min(m, n - lo)])
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return (flat * (std / 2.0)).to(device=device, dtype=dtype).reshape(dims)

    def _standard_sums(self, n: int) -> NDArray[np.float64]:
        """``n`` values of ``g_1 + g_2 + g_3 + g_4`` (numpy, in chunks)."""
        out = np.empty(n, dtype=np.float64)
        for lo in range(0, n, _CHUNK_VALUES):
            hi = min(lo + _CHUNK_VALUES, n)
            m = max(hi - lo, 2)  # four distinct pairs per value need two values' words
            out[lo:hi] = _sum_of_four_numpy(self._words(_WORDS_PER_VALUE * m))[: hi - lo]
        return out


class CsprngNoise(ChaChaNoise):
    """The default noise source: a fresh 256-bit key from the OS CSPRNG, not reproducible."""

    def __init__(self) -> None:
        super().__init__(secrets.token_bytes(32))


class SeededNoise(ChaChaNoise):
    """Reproducible noise, key = SHA-256 of ``seed``: for simulations and tests.

    Same method as :class:`CsprngNoise`; only the key differs. Whoever knows the seed
    can recompute and subtract the noise, so the DP guarantee holds only against
    someone who does not. With a seed derived from public values (a simulation's run
    seed, a round number) that is everyone: never use such a seed on real data. The
    one legitimate use on real data is a *secret* seed of at least 128 random bits
    (``bytes``, e.g. an HMAC of the node's own secret key with run, round and client),
    when a retried release must repeat the same noise rather than publish a second,
    unaccounted draw.
    """

    def __init__(self, seed: int | bytes) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int | bytes):
            raise ValueError(f"`seed` must be an int or bytes, got {type(seed).__name__}.")
        if isinstance(seed, int):
            if seed < 0:
                raise ValueError(f"`seed` must be >= 0, got {seed}.")
            seed = seed.to_bytes(max(1, (seed.bit_length() + 7) // 8), "little")
        super().__init__(hashlib.sha256(b"fedtune.SeededNoise\x00" + seed).digest())


def _check(shape: Sequence[int], std: float) -> tuple[tuple[int, ...], float]:
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"`shape` must have non-negative sizes, got {tuple(shape)}.")
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"`std` must be finite and >= 0, got {std}.")
    return dims, std


def _sum_of_four_numpy(words: NDArray[np.uint64]) -> NDArray[np.float64]:
    """``g_1 + g_2 + g_3 + g_4`` per value from ``4 n`` words (Box--Muller, float64).

    Words ``j`` and ``2n + j`` make pair ``j`` (``u1``, ``u2``) of ``2n`` pairs, each
    giving ``c_j = r_j cos`` and ``s_j = r_j sin``. Value ``i`` is
    ``((c_i + c_(n+i)) + s_(i+1)) + s_(n+i+1)`` (indices mod ``2n``): four different
    pairs for ``n >= 2`` (callers pass at least 8 words), each normal used once. Adding
    ``c_j + s_j`` instead would be ``sqrt(2) r_j sin(theta_j + pi/4)``, a single
    Gaussian, and halve the number of summed samples the method relies on. In place
    where possible: this runs once per DP-SGD step.
    """
    k = (words >> np.uint64(64 - _MANTISSA)).astype(np.float64)  # exact: < 2^53
    pairs = len(k) // 2
    n = pairs // 2
    r = k[:pairs]
    r += 1.0
    r *= _TWO_POW_M53  # u1 in (0, 1]: log never sees 0
    np.log(r, out=r)
    r *= -2.0
    np.sqrt(r, out=r)
    theta = k[pairs:]
    theta *= 2.0 * math.pi * _TWO_POW_M53  # [0, 2 pi)
    c = np.cos(theta)
    c *= r
    s = np.sin(theta, out=theta)
    s *= r
    out = c[:n] + c[n:]
    out += s[1 : n + 1]
    out[: n - 1] += s[n + 1 :]
    out[n - 1] += s[0]
    return out


def _sum_of_four_torch(words: torch.Tensor) -> torch.Tensor:
    """As :func:`_sum_of_four_numpy` for int64 words (bit patterns), on a CUDA device."""
    import torch

    k = ((words >> (64 - _MANTISSA)) & ((1 << _MANTISSA) - 1)).to(torch.float64)
    pairs = k.numel() // 2
    n = pairs // 2
    r = torch.sqrt(-2.0 * torch.log((k[:pairs] + 1.0) * _TWO_POW_M53))
    theta = k[pairs:] * (2.0 * math.pi * _TWO_POW_M53)
    c = r * torch.cos(theta)
    s = r * torch.sin(theta)
    out = c[:n] + c[n:]
    out += s[1 : n + 1]
    out[: n - 1] += s[n + 1 :]
    out[n - 1] += s[0]
    return out
