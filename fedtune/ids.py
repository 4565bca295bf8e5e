"""Numbers parsed from untrusted strings: ASCII digits only.

``str.isdigit()`` and ``int()`` accept any Unicode decimal digit, so ``'١٢٣'``
(Arabic-Indic) or ``'１２３'`` (fullwidth) parse as 123: two spellings of one id, one
of which no log reader or allow-list expects. Every id, port or count fedtune reads
from a string goes through :func:`parse_decimal` instead.
"""

from __future__ import annotations

import re

__all__ = ["is_decimal", "parse_decimal"]

_DECIMAL = re.compile(r"[0-9]+")


def is_decimal(text: object, *, max_digits: int = 20) -> bool:
    """Whether ``text`` is a string of 1 to ``max_digits`` ASCII digits ``0-9``."""
    return (
        isinstance(text, str) and len(text) <= max_digits and _DECIMAL.fullmatch(text) is not None
    )


def parse_decimal(text: object, *, key: str, max_digits: int = 20) -> int:
    """``text`` as a non-negative integer, ASCII digits only.

    Parameters
    ----------
    text : object
        The untrusted value (must be a ``str``).
    key : str
        Its name, for the error message.
    max_digits : int
        The most digits accepted (20 holds any uint64).

    Raises
    ------
    ValueError
        Naming ``key`` and the value, unless ``text`` is 1 to ``max_digits`` ASCII digits.
    """
    if not is_decimal(text, max_digits=max_digits):
        raise ValueError(
            f"{key} must be 1 to {max_digits} ASCII digits 0-9, got {text!r}; "
            "send the number in plain decimal."
        )
    return int(str(text))
