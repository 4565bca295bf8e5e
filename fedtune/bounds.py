"""Bounded influence: how far one client's update, and the sum of all, may reach.

CKKS stores every value as ``round(x * Delta) mod q``: a sum beyond the usable
range (:attr:`fedtune.crypto.CkksParams.max_abs_value`, ``2 ** 24`` with the
default parameters) wraps around the modulus and decrypts to garbage that looks
like any other number. Measured with a cap of 1e7 examples per client: four
honest clients with ``n_k = 1e7`` and ``w = 0.9`` sum to 3.6e7 per coordinate, past
the true half-modulus ``q / (2 Delta)`` (about 3.4e7), and the key holders
decrypt a mean of -0.78 instead of 0.9.

The server adds ``sum_k n_k w_k`` without reading it, so the only bound it can
enforce is on what it can see: the counts. With every adapter entry assumed to
satisfy ``|w| <= VALUE_BOUND``::

    sum_k n_k * max|w_k|  <=  num-clients * max-client-examples * VALUE_BOUND
                          <=  capacity (= max_abs_value)

:func:`check_capacity` refuses a configuration that breaks the second line; the
strategy refuses a count above ``max-client-examples`` and, in plaintext, an update
with an entry beyond ``VALUE_BOUND``; the key holders refuse a decrypted mean beyond
it (:class:`fedtune.guard.MovementGuard`, which also bounds each round's
movement: :mod:`fedtune.movement`).

What this does not do: it limits what a forged or scaled update can do to the
model (no entry of the mean can leave ``[-VALUE_BOUND, VALUE_BOUND]``, and an
encrypted sum that wrapped is caught when its garbage lands outside that range),
but a malicious key holder who stays within the bounds can still move the mean
anywhere inside them, and the server cannot see an encrypted update's values at
all. The cryptographic answer, zero-knowledge proofs that each encrypted update
has a bounded norm (RoFL, Lycklama et al., IEEE S&P 2023,
https://arxiv.org/abs/2107.03311; ACORN, Bell et al., USENIX Security 2023,
https://eprint.iacr.org/2022/1461), is not built.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fedtune.errors import BoundError, ConfigError

if TYPE_CHECKING:
    from fedtune.crypto.params import CkksParams

#: Largest ``|w|`` any adapter entry may take (LoRA A/B and the head). Honest
#: entries are far smaller (LoRA's ``A`` starts within ``1 / sqrt(fan_in)``, ``B`` at
#: zero); 64 leaves room for client-level DP noise shares. The capacity check, the
#: server's plaintext check and the key holders' check all use it.
VALUE_BOUND = 64.0


def ckks_capacity(params: CkksParams) -> float:
    """Largest ``|sum_k n_k w_k|`` per coordinate that decrypts correctly.

    ``2 ** (data_modulus_bits - global_scale_bits - 2)``: values live in
    ``(-q/2, q/2)`` once scaled by ``Delta``, with one more bit of headroom for
    noise and rounding (:attr:`CkksParams.max_abs_value`). ``2 ** 24`` for the
    default ``q = 59`` bits, ``Delta = 2 ** 33``.
    """
    return params.max_abs_value


def max_total_examples(*, capacity: float, value_bound: float = VALUE_BOUND) -> int:
    """Most examples (``sum_k n_k``) a round may add: ``floor(capacity / value_bound)``.

    >>> max_total_examples(capacity=2.0**24)
    262144
    """
    return math.floor(capacity / value_bound)


def check_capacity(
    *,
    num_clients: int,
    max_client_examples: int,
    capacity: float,
    value_bound: float = VALUE_BOUND,
) -> None:
    """Refuse a run whose largest possible encrypted sum would wrap the CKKS modulus.

    Raises
    ------
    ConfigError
        When ``num_clients * max_client_examples * value_bound > capacity``.
    """
    worst = num_clients * max_client_examples * value_bound
    if worst > capacity:
        most = max_total_examples(capacity=capacity, value_bound=value_bound)
        raise ConfigError(
            f"`num-clients` ({num_clients}) x `max-client-examples` ({max_client_examples}) "
            f"x the adapter value bound ({value_bound:g}) is {worst:.4g}, more than the "
            f"{capacity:.4g} the CKKS parameters can sum without wrapping the modulus "
            f"(the decrypted mean would be garbage). Lower `max-client-examples` to at most "
            f"{most // num_clients} (at most {most} examples in all), or use CKKS "
            "parameters with more modulus bits above the scale."
        )


def _describe(vector: NDArray[np.floating]) -> str:
    bad = int(np.count_nonzero(~np.isfinite(vector)))
    if bad:
        return f"{bad} NaN or infinite entries"
    return f"an entry of magnitude {float(np.max(np.abs(vector))):.4g}"


def within_bound(vector: NDArray[np.floating], value_bound: float = VALUE_BOUND) -> bool:
    """True when every entry is finite and ``|v_i| <= value_bound``."""
    v = np.asarray(vector, dtype=np.float64)
    return bool(np.isfinite(v).all() and (v.size == 0 or np.max(np.abs(v)) <= value_bound))


def check_update(
    prescaled: NDArray[np.floating], num_examples: int, value_bound: float = VALUE_BOUND
) -> None:
    """Plaintext only: ``n_k w_k / n_k`` must be finite and within ``value_bound``.

    Raises
    ------
    BoundError
        Naming what was found (non-finite entries or the largest magnitude).
    """
    w = np.asarray(prescaled, dtype=np.float64) / num_examples
    if not within_bound(w, value_bound):
        raise BoundError(
            f"update / num-examples holds {_describe(w)}; adapter entries must be finite "
            f"with |w| <= {value_bound:g}."
        )
