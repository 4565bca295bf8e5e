"""CKKS encryption parameters and the sizes they imply.

The aggregation protocol only *adds* ciphertexts, so the multiplicative depth is
zero and a single prime is enough for the coefficient modulus: no rescaling,
no key switching, hence no special prime, relinearisation or Galois keys.
Everything below follows from three numbers:

``N`` (``poly_modulus_degree``)
    Ring dimension. One ciphertext holds ``N / 2`` complex slots; we put two
    real parameters in each slot (real and imaginary part), so one chunk
    carries ``N`` parameters.
``q`` (the data-level coefficient modulus, ``data_modulus_bits`` bits)
    Every value is stored as ``round(x * Delta) mod q`` (plus noise), so the
    aggregate ``sum_k n_k w_k`` must satisfy ``|sum| * Delta < q / 2``.
``Delta = 2 ** global_scale_bits``
    Fixed-point scale: the decoding error is ``noise / Delta`` in absolute
    terms, independent of the magnitude of the values (see
    :attr:`CkksParams.fresh_noise_std`).

A fresh symmetric ciphertext is serialised *seeded*: the uniformly random
polynomial ``c1 = a`` is replaced by the seed that generated it, so an upload
costs one polynomial, ``N * log2(q) / 8`` bytes of entropy, for ``N``
parameters: about ``log2(q) / 8`` bytes per parameter. A sum of ciphertexts
is not seeded and costs twice that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_PARAMS", "MAX_COEFF_MODULUS_BITS_128", "CkksParams"]

#: Largest total coefficient-modulus size per ring dimension at 128-bit
#: classical security (HomomorphicEncryption.org standard, ternary secret),
#: identical to ``seal.CoeffModulus.MaxBitCount(N, sec_level_type.tc128)``
#: (a test checks the two agree).
MAX_COEFF_MODULUS_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

# SEAL samples encryption noise from a centred binomial distribution, the
# difference of two sums of 21 fair bits (seal/util/rlwe.cpp, sample_poly_cbd):
# variance 21 / 2 per coefficient, |e_i| <= 21.
_NOISE_VARIANCE = 10.5
# Rounding the scaled message to integer coefficients: uniform on [-1/2, 1/2].
_ROUNDING_VARIANCE = 1.0 / 12.0

# SEAL accepts primes of at most 60 bits; below 20 bits CKKS has no precision left.
_MIN_PRIME_BITS = 20
_MAX_PRIME_BITS = 60

# Bytes a SEAL ciphertext spends outside its polynomial data: the 16-byte
# SEALHeader, the metadata (parms_id, NTT flag, sizes, scale, correction
# factor) and, for a seeded ciphertext, the PRNG seed. Measured at about 150;
# the bound is generous on purpose, it only caps what we are willing to read.
_CIPHERTEXT_OVERHEAD_BYTES = 1024


@dataclass(frozen=True, kw_only=True)
class CkksParams:
    """Parameters of the CKKS scheme used for encrypted aggregation.

    Parameters
    ----------
    poly_modulus_degree : int
        Ring dimension ``N``, a power of two in ``[1024, 32768]``.
    coeff_mod_bit_sizes : tuple[int, ...]
        Bit sizes of the primes of the coefficient modulus. With one prime it
        is the data modulus; with several, SEAL reserves the last one as the
        key-switching ("special") prime and ciphertexts live modulo the others.
        The total must not exceed :data:`MAX_COEFF_MODULUS_BITS_128` ``[N]``.
    global_scale_bits : int
        ``log2`` of the CKKS scale ``Delta``.

    Notes
    -----
    CKKS is due to Cheon, Kim, Kim and Song, "Homomorphic Encryption for
    Arithmetic of Approximate Numbers", ASIACRYPT 2017,
    https://eprint.iacr.org/2016/421.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (59,)
    global_scale_bits: int = 33

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if isinstance(n, bool) or not isinstance(n, int) or n not in MAX_COEFF_MODULUS_BITS_128:
            raise ValueError(
                "`poly_modulus_degree` should be one of "
                f"{sorted(MAX_COEFF_MODULUS_BITS_128)}, got {n!r}."
            )
        bits = self.coeff_mod_bit_sizes
        if not isinstance(bits, tuple) or not bits:
            raise ValueError(
                f"`coeff_mod_bit_sizes` should be a non-empty tuple of ints, got {bits!r}."
            )
        for b in bits:
            if isinstance(b, bool) or not isinstance(b, int):
                raise TypeError(f"`coeff_mod_bit_sizes` should hold ints, got {bits!r}.")
            if not _MIN_PRIME_BITS <= b <= _MAX_PRIME_BITS:
                raise ValueError(
                    f"`coeff_mod_bit_sizes` entries should lie in "
                    f"[{_MIN_PRIME_BITS}, {_MAX_PRIME_BITS}], got {bits!r}."
                )
        limit = MAX_COEFF_MODULUS_BITS_128[n]
        if sum(bits) > limit:
            raise ValueError(
                f"`coeff_mod_bit_sizes` {bits!r} total {sum(bits)} bits, more than the "
                f"{limit} bits allowed at 128-bit security for poly_modulus_degree={n}; "
                "use fewer or smaller primes, or a larger poly_modulus_degree."
            )
        s = self.global_scale_bits
        if (
            isinstance(s, bool)
            or not isinstance(s, int)
            or not 1 <= s <= self.data_modulus_bits - 2
        ):
            raise ValueError(
                "`global_scale_bits` should be an int in "
                f"[1, {self.data_modulus_bits - 2}] (data modulus bits - 2), got {s!r}."
            )

    # ----- derived quantities -------------------------------------------------

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus that ciphertexts actually live under."""
        bits = self.coeff_mod_bit_sizes
        return bits[0] if len(bits) == 1 else sum(bits[:-1])

    @property
    def data_prime_count(self) -> int:
        """Number of primes in the data-level modulus (``L``)."""
        return max(1, len(self.coeff_mod_bit_sizes) - 1)

    @property
    def slot_count(self) -> int:
        """Complex CKKS slots per ciphertext, ``N / 2``."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_chunk(self) -> int:
        """Real parameters per ciphertext: two per complex slot, ``N``."""
        return self.poly_modulus_degree

    @property
    def scale(self) -> float:
        """The CKKS scale ``Delta = 2 ** global_scale_bits``."""
        return float(2**self.global_scale_bits)

    @property
    def max_abs_value(self) -> float:
        """Largest ``|value|`` an aggregate may reach and still decrypt correctly.

        ``2 ** (data_modulus_bits - global_scale_bits - 2)``: one bit for the
        sign (values live in ``(-q/2, q/2)``) and one bit of headroom for
        noise and rounding. The bound applies to the *sum* over all clients;
        a sum beyond it wraps around modulo ``q`` and decrypts to garbage,
        which nobody can detect, so every single encryption is checked
        against it and callers must keep the total below it as well.
        """
        return float(2 ** (self.data_modulus_bits - self.global_scale_bits - 2))

    @property
    def fresh_noise_std(self) -> float:
        """Standard deviation of the decryption error of one fresh ciphertext, per value.

        Decryption returns ``m + e`` with ``e`` the encryption noise plus the
        rounding of ``Delta * x`` to integers, ``N`` independent coefficients.
        A slot is the polynomial evaluated at a root of unity, a sum of ``N``
        such terms, so its real and imaginary parts (two parameters) each have
        variance ``N / 2 * (sigma^2 + 1/12)``; decoding divides by ``Delta``::

            std = sqrt(N / 2 * (10.5 + 1 / 12)) / 2 ** global_scale_bits

        ``sigma^2 = 10.5`` is SEAL's centred binomial noise. The error is
        Gaussian to a very good approximation and does not depend on the
        values; a sum of ``K`` ciphertexts has ``sqrt(K)`` times this error,
        and the weighted mean divides it by ``sum_k n_k``. Matches measurement
        to 0.1% (``benchmarks/bench_crypto.py``).
        """
        variance = self.slot_count * (_NOISE_VARIANCE + _ROUNDING_VARIANCE)
        return math.sqrt(variance) / self.scale

    def chunk_count(self, length: int) -> int:
        """Number of ciphertexts that carry a vector of ``length`` values."""
        return math.ceil(length / self.values_per_chunk)

    @property
    def min_chunk_bytes(self) -> int:
        """Fewest bytes a genuine serialised ciphertext can occupy.

        At least one polynomial of ``N * L`` coefficients uniform modulo
        ``q``: ``N * data_modulus_bits / 8`` bytes of entropy that no
        compression can remove.
        """
        return self.poly_modulus_degree * self.data_modulus_bits // 8

    def max_chunk_bytes(self, *, polys: int) -> int:
        """Most bytes a serialised ciphertext with ``polys`` stored polynomials can take.

        A fresh seeded upload stores one polynomial (``polys=1``), an
        aggregate two (``polys=2``); uncompressed, each coefficient takes 8
        bytes.
        """
        if polys not in (1, 2):
            raise ValueError(f"`polys` should be 1 or 2, got {polys!r}.")
        n, lvl = self.poly_modulus_degree, self.data_prime_count
        return polys * n * lvl * 8 + _CIPHERTEXT_OVERHEAD_BYTES


#: Chosen by measurement (``python benchmarks/bench_crypto.py``); see the
#: package docstring of :mod:`fedtune.crypto` for the numbers and the
#: candidates that lost.
DEFAULT_PARAMS = CkksParams(
    poly_modulus_degree=4096, coeff_mod_bit_sizes=(59,), global_scale_bits=33
)
