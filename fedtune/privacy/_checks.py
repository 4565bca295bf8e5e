"""Input checks shared by the privacy modules.

Every check raises ``ValueError`` naming the parameter and the value it got, so a
misconfigured run fails at the first call with a message that says what to fix.
"""

from __future__ import annotations

import math
import numbers

__all__ = [
    "check_delta",
    "check_epsilon",
    "check_non_negative",
    "check_positive",
    "check_positive_int",
    "check_sample_rate",
]


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    return out


def check_epsilon(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite epsilon ``> 0``."""
    out = _as_float(name, value)
    if not (0.0 < out < math.inf):
        raise ValueError(f"`{name}` must be a finite epsilon > 0, got {value!r}.")
    return out


def check_delta(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a delta in the open interval (0, 1)."""
    out = _as_float(name, value)
    if not (0.0 < out < 1.0):
        raise ValueError(f"`{name}` must be a delta in (0, 1), got {value!r}.")
    return out


def check_sample_rate(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a sampling probability in (0, 1]."""
    out = _as_float(name, value)
    if not (0.0 < out <= 1.0):
        raise ValueError(f"`{name}` must be a sampling probability in (0, 1], got {value!r}.")
    return out


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is finite and ``> 0``."""
    out = _as_float(name, value)
    if not (0.0 < out < math.inf):
        raise ValueError(f"`{name}` must be finite and > 0, got {value!r}.")
    return out


def check_non_negative(name: str, value: object) -> float:
    """Return ``value`` as a float if it is finite and ``>= 0``."""
    out = _as_float(name, value)
    if not (0.0 <= out < math.inf):
        raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}.")
    return out


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer ``>= 1`` (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return int(value)
