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
RFC 8439) under a 256-bit key; consecutive 64-bit words ``(a, b)`` give a candidate pair of
53-bit uniforms ``u = a' 2^-52 - 1``, ``v = b' 2^-52 - 1`` in ``[-1, 1)`` (``a'`` the top 53
bits of ``a``), and the pairs with ``0 < s = u^2 + v^2 < 1`` give two independent standard
normals each by Marsaglia's polar method (``f = sqrt(-2 ln s / s)``, ``z = (u f, v f)``, all
in float64; Marsaglia & Bray 1964). Every returned value is

    z = std * (g_1 + g_2 + g_3 + g_4) / 2,        g_i ~ N(0, 1) independent,

which is N(0, std^2), with the four ``g_i`` from four different accepted pairs. The polar
method replaced Box--Muller because numpy's float64 ``sin`` and ``cos`` took 80% of a draw
(26 ns a value each on the 2-core CPU; ``log``, ``sqrt`` and ``/`` are vectorised), for
the same distribution. Summing ``2n`` Gaussians is the defence of Holohan and Braghin
("Secure Random Sampling in Differential Privacy", ESORICS 2021,
https://arxiv.org/abs/2107.10138, section 5.1), with ``n = 2`` as in Opacus'
``secure_mode`` (``opacus/optimizers/optimizer.py``, ``_generate_noise``: four
``torch.normal`` draws summed and divided by 2). Why it resists the attack: to rule
out an input ``x`` from an output ``y`` the attacker must show that ``y - x`` is
*not* a value the sampler can produce. For one sample of one pair that set is small
enough to search (a function of two 53-bit integers); for the sum of ``2n`` samples it
is the set of float sums of ``2n`` such values, ``2^(53(2n-1)) = 2^159``
candidates for ``n = 2``, dense among the floats near every ``y``, so no ``x`` can be
excluded. The sum is formed and scaled in float64 and rounded once to the requested
dtype (:func:`fedtune.privacy.dpsgd.make_dp_training` even adds it to the gradient
in float64 before rounding), so a float32 / bfloat16 output is a rounding of an
essentially continuous value: its low-order bits test uniform
(``tests/test_privacy_noise.py``). Limitation: the float64 sum itself is not uniform
in its last bit or two -- adding four float64 terms rounds half to even, and the
measured chi-square p-value of the lowest bit is 0 at 10^6 samples -- so float64
parameters get the guarantee of Opacus' ``secure_mode`` (the same sum), no more. None of
this is a bound on the privacy loss of the floating-point mechanism: ``docs/float-noise.md``
says what is proven and what only measured. DP-SGD (by default) and client-level releases use
the exact discrete Gaussian on a power-of-two grid instead (Canonne, Kamath & Steinke,
NeurIPS 2020, https://arxiv.org/abs/2004.00010; :mod:`fedtune.privacy.discrete`,
:mod:`fedtune.privacy.discrete_array`, :mod:`fedtune.privacy.optimizer`), whose uniform
integers are this module's keystream words; the float Gaussians here remain for DP
held-out evaluation (:mod:`fedtune.privacy.evaluation`) and for DP-SGD with
``dp-noise = "float"``, whose ε is proven only for the ideal mechanism.

Two key sources, one method:

* :class:`CsprngNoise` (the default everywhere): a fresh key from the OS CSPRNG
  (:func:`secrets.token_bytes`), never stored, so the noise cannot be reproduced.
* :class:`SeededNoise`: the key is SHA-256 of a seed, so the noise is reproducible --
  for simulations and tests. Anyone who knows the seed knows the noise; never use it on
  real data with a seed that is not a secret (see the class).

Keystream request ``i`` of a source (``i = 0, 1, ...``) reads the keystream under nonce
``i`` from block 0, so no (key, nonce) pair is ever reused and a :class:`SeededNoise`
replays the same values for the same sequence of calls. A draw of ``n`` values needs
``2n`` accepted pairs (``max(n, 2)``: four different pairs per value); it requests
:func:`_candidates` pairs for those still missing, at most 2^14 at a time, until it has
them (acceptance is ``pi / 4``). Nothing here touches global RNG state.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch

__all__ = ["ChaChaNoise", "CsprngNoise", "NoiseSource", "SeededNoise"]

#: ChaCha20's block counter is 32 bits: one nonce covers 2^32 blocks of 64 bytes.
_MAX_BYTES_PER_DRAW = (1 << 32) * 64
_MANTISSA = 53
_TWO_POW_M52 = 2.0 ** -(_MANTISSA - 1)
_CANDIDATES_PER_REQUEST = 1 << 14  # measured: 30% faster per value than one big request
_STEP_BYTES = 1 << 24  # keystream bytes per OpenSSL call
_ZEROS = bytes(0)
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
        out = np.empty(count, dtype="<u8")
        view = memoryview(out.data).cast("B")
        zeros = _zeros(min(_STEP_BYTES, nbytes))
        for start in range(0, nbytes, _STEP_BYTES):
            stop = min(start + _STEP_BYTES, nbytes)
            encryptor.update_into(zeros[: stop - start], view[start:stop])
        return out.astype(np.uint64, copy=False)

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
            z1, z2 = self._pairs(2 * m, device)
            parts.append(_combine(z1, z2)[: min(m, n - lo)])
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return (flat * (std / 2.0)).to(device=device, dtype=dtype).reshape(dims)

    def _pairs(self, count: int, device: torch.device | None = None):  # type: ignore[no-untyped-def]
        """The normals ``(z1, z2)`` of the next ``count`` accepted pairs of the keystream.

        numpy float64 arrays, or with ``device`` float64 tensors computed there.
        """
        first: list = []  # type: ignore[type-arg]
        second: list = []  # type: ignore[type-arg]
        have = 0
        while have < count:  # requests of at most 2^14 candidates stay in the CPU caches
            words = self._words(2 * min(_candidates(count - have), _CANDIDATES_PER_REQUEST))
            if device is None:
                pair: tuple = _polar_numpy(words)  # type: ignore[type-arg]
            else:
                import torch

                pair = _polar_torch(torch.from_numpy(words.view(np.int64)).to(device))
            first.append(pair[0])
            second.append(pair[1])
            have += len(pair[0])
        if device is None:
            return np.concatenate(first)[:count], np.concatenate(second)[:count]
        import torch

        return torch.cat(first)[:count], torch.cat(second)[:count]

    def _standard_sums(self, n: int) -> NDArray[np.float64]:
        """``n`` values of ``g_1 + g_2 + g_3 + g_4`` (numpy, in chunks)."""
        out = np.empty(n, dtype=np.float64)
        for lo in range(0, n, _CHUNK_VALUES):
            hi = min(lo + _CHUNK_VALUES, n)
            m = max(hi - lo, 2)  # four distinct pairs per value need two values' pairs
            z1, z2 = self._pairs(2 * m)
            out[lo:hi] = _combine(z1, z2)[: hi - lo]
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


def _zeros(nbytes: int) -> memoryview:
    """A read-only all-zero buffer of at least ``nbytes`` (kept: a fresh one per draw
    cost more page faults than the cipher itself)."""
    global _ZEROS  # noqa: PLW0603 - a grow-only cache of zeros, safe to share
    if len(_ZEROS) < nbytes:
        _ZEROS = bytes(nbytes)
    return memoryview(_ZEROS)


def _check(shape: Sequence[int], std: float) -> tuple[tuple[int, ...], float]:
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"`shape` must have non-negative sizes, got {tuple(shape)}.")
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"`std` must be finite and >= 0, got {std}.")
    return dims, std


def _candidates(pairs: int) -> int:
    """Candidate pairs to request for ``pairs`` accepted ones.

    Acceptance is ``pi / 4``: ``1.28 p + 4 sqrt(p) + 8`` candidates accept ``p`` or
    more except with odds below 1e-10, so a second request is rare.
    """
    return math.ceil(1.28 * pairs + 4.0 * math.sqrt(pairs)) + 8


def _polar_numpy(words: NDArray[np.uint64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Marsaglia's polar method on ``2m`` words; the accepted candidates' normals, in order.

    Word ``t`` gives ``u`` and word ``m + t`` gives ``v`` of candidate ``t``; a candidate
    is accepted when ``0 < s = u^2 + v^2 < 1`` and gives ``(u f, v f)``,
    ``f = sqrt(-2 ln s / s)``. In place where possible: this runs once per DP-SGD step.
    """
    k = (words >> np.uint64(64 - _MANTISSA)).astype(np.float64)  # exact: < 2^53
    k *= _TWO_POW_M52
    k -= 1.0  # [-1, 1), exact
    m = len(k) // 2
    u, v = k[:m], k[m : 2 * m]
    s = u * u
    s += v * v
    accepted = np.flatnonzero((s < 1.0) & (s > 0.0))
    s = s.take(accepted)
    f = np.log(s)
    f *= -2.0
    f /= s
    np.sqrt(f, out=f)
    z1 = u.take(accepted)
    z1 *= f
    z2 = v.take(accepted)
    z2 *= f
    return z1, z2


def _polar_torch(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_polar_numpy` for int64 words (bit patterns), on the words' device."""
    import torch

    k = ((words >> (64 - _MANTISSA)) & ((1 << _MANTISSA) - 1)).to(torch.float64)
    k = k * _TWO_POW_M52 - 1.0
    m = k.numel() // 2
    u, v = k[:m], k[m : 2 * m]
    s = u * u + v * v
    accepted = torch.nonzero((s < 1.0) & (s > 0.0)).flatten()
    s = s[accepted]
    f = torch.sqrt(-2.0 * torch.log(s) / s)
    return u[accepted] * f, v[accepted] * f


def _combine(z1, z2):  # type: ignore[no-untyped-def]
    """``g_1 + g_2 + g_3 + g_4`` per value from the normals of ``2n`` accepted pairs.

    Value ``i`` is ``((z1_i + z1_(n+i)) + z2_(i+1)) + z2_(n+i+1)`` (indices mod ``2n``):
    four different pairs for ``n >= 2``, each normal used once. Adding both normals of
    one pair, ``(u + v) f``, would be a single Gaussian, and halve the number of summed
    samples the method relies on. Works on numpy arrays and torch tensors alike.
    """
    pairs = len(z1)
    n = pairs // 2
    out = z1[:n] + z1[n:pairs]
    out += z2[1 : n + 1]
    out[: n - 1] += z2[n + 1 : pairs]
    out[n - 1] += z2[0]
    return out
