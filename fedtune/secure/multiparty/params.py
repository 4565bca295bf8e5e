"""Parameters of multiparty CKKS and the smudging noise they imply (docs/multiparty.md).

Why other CKKS parameters than shared-key CKKS (:data:`fedtune.crypto.DEFAULT_PARAMS`,
``N = 4096``, one 59-bit prime, scale ``2^33``): a partial decryption carries smudging
noise ``2^(lambda) N R B`` wide (see :attr:`MultipartyParams.smudging_bits`), about
``2^74``, and the decoded sum must still be good to ``1e-4``. That needs a scale near
``2^94`` and, for the same value range as today (``2^24``), a data modulus of 120 bits:
two 60-bit primes, which ``N = 4096`` (109 bits at 128-bit security) cannot hold. So
``N = 8192`` with primes ``(60, 60, 20)``: SEAL keeps the last as its key-switching prime,
unused by symmetric encryption (140 of the 218 bits allowed at 128-bit security).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedtune.crypto.params import CkksParams

__all__ = ["MULTIPARTY_CKKS", "MultipartyParams"]

#: CKKS parameters of multiparty runs (module docstring).
MULTIPARTY_CKKS = CkksParams(
    poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60, 20), global_scale_bits=94
)

# SEAL's encryption noise: centred binomial, variance 21/2; CKKS encoding rounds
# each coefficient (uniform on [-1/2, 1/2], variance 1/12).
_FRESH_VARIANCE = 10.5 + 1.0 / 12.0
# Tail factor of the bound B on the decryption noise of a sum: a sum of K independent
# centred terms of variance v exceeds 10 sqrt(K v) with probability < 2^-75 (sub-Gaussian).
_TAIL = 10.0


@dataclass(frozen=True, kw_only=True)
class MultipartyParams:
    """What the smudging noise of a partial decryption is sized from.

    Attributes
    ----------
    ckks : CkksParams
        The encryption parameters (:data:`MULTIPARTY_CKKS`).
    security_bits : int
        Statistical security ``lambda``: the statistical distance between what the
        parties see and what a simulator without the secret noise produces is at most
        ``2^-lambda`` over the key's whole life. At least 40.
    max_rounds : int
        Partial decryptions a key holder makes with one set of key shares (one per
        round, so the rounds of the run); it refuses more.
    max_uploads : int
        Most uploads one decrypted sum may hold.
    """

    ckks: CkksParams = field(default_factory=lambda: MULTIPARTY_CKKS)
    security_bits: int = 40
    max_rounds: int = 1024
    max_uploads: int = 1024

    def __post_init__(self) -> None:
        for name in ("security_bits", "max_rounds", "max_uploads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` should be a positive int, got {value!r}.")
        if self.security_bits < 40:
            raise ValueError(
                f"`security_bits` should be at least 40, got {self.security_bits}; the "
                "smudging argument of docs/multiparty.md needs it."
            )
        # Values reach q/4 (max_abs_value); up to 256 holders' noise must stay under q/4.
        if self.smudging_bits + 8 > self.ckks.data_modulus_bits - 2:
            raise ValueError(
                f"{self.ckks} leaves no room for {self.smudging_bits}-bit smudging noise "
                f"({self.ckks.data_modulus_bits}-bit data modulus); use more modulus bits "
                "or fewer rounds/uploads."
            )

    @property
    def noise_bound(self) -> float:
        """``B``: bound on the secret noise of a sum of ``max_uploads`` fresh uploads."""
        return _TAIL * math.sqrt(self.max_uploads * _FRESH_VARIANCE)

    @property
    def smudging_bits(self) -> int:
        """``b``: each key holder adds noise uniform on ``[-2^(b-1), 2^(b-1))`` per coefficient.

        One coefficient's decryption noise ``e`` (``|e| <= B``) shifted by a uniform
        ``U`` of width ``2^b`` is within statistical distance ``B / 2^b`` of ``U``
        alone. A key holder publishes ``N`` coefficients per partial decryption and at
        most ``max_rounds`` of them, so by the union bound the whole transcript is within
        ``N R B / 2^b`` of one made without the noise: ``b = lambda + log2(N R B)``
        (rounded up) keeps that below ``2^-lambda``. One honest key holder's noise is
        enough; the others' only add.
        """
        n = self.ckks.poly_modulus_degree
        return math.ceil(
            self.security_bits
            + math.log2(n)
            + math.log2(self.max_rounds)
            + math.log2(self.noise_bound)
        )

    def decoded_error_std(self, holders: int) -> float:
        """Standard deviation of the decoded sum's error per value, ``holders`` partials.

        A slot is ``N`` coefficients' weighted sum; real and imaginary parts each get
        ``N / 2`` times the per-coefficient variance ``holders 2^(2b) / 12``; decoding
        divides by the scale. (The fresh encryption noise, ``2^-70`` as large, is left out.)
        """
        n = self.ckks.poly_modulus_degree
        var = holders * 2.0 ** (2 * self.smudging_bits) / 12.0
        return math.sqrt(n / 2 * var) / self.ckks.scale
