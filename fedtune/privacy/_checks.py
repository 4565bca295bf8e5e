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
    "check_range",
    "check_sample_rate",
]


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    return out


_EPSILON = "a finite epsilon > 0"
_SAMPLE_RATE = "a sampling probability in (0, 1]"


def check_range(
    name: str,
    value: object,
    *,
    low: float,
    high: float,
    low_open: bool,
    high_open: bool,
    what: str,
) -> float:
    """Return ``value`` as a float if it lies between ``low`` and ``high``.

    Each end is excluded when its ``*_open`` flag is set (an open end at ``±inf`` makes
    the range finite on that side). Otherwise raise ``ValueError``:
    ``"`name` must be {what}, got {value!r}."``.
    """
    out = _as_float(name, value)
    above = low < out if low_open else low <= out
    below = out < high if high_open else out <= high
    if not (above and below):
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")
    return out


def check_epsilon(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite epsilon ``> 0``."""
    return check_range(
        name, value, low=0.0, high=math.inf, low_open=True, high_open=True, what=_EPSILON
    )


def check_delta(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a delta in the open interval (0, 1)."""
    return check_range(
        name, value, low=0.0, high=1.0, low_open=True, high_open=True, what="a delta in (0, 1)"
    )


def check_sample_rate(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a sampling probability in (0, 1]."""
    return check_range(
        name, value, low=0.0, high=1.0, low_open=True, high_open=False, what=_SAMPLE_RATE
    )


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is finite and ``> 0``."""
    return check_range(
        name, value, low=0.0, high=math.inf, low_open=True, high_open=True, what="finite and > 0"
    )


def check_non_negative(name: str, value: object) -> float:
    """Return ``value`` as a float if it is finite and ``>= 0``."""
    return check_range(
        name, value, low=0.0, high=math.inf, low_open=False, high_open=True, what="finite and >= 0"
    )


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer ``>= 1`` (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return int(value)
