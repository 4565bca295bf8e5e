"""The config error and the two checks every config dataclass validates with."""

from __future__ import annotations

from fedtune.errors import ConfigError

__all__ = ["choice", "require"]


def require(ok: bool, key: str, value: object, expected: str) -> None:
    """Raise ``ConfigError("`key` expected, got value.")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"`{key}` {expected}, got {value!r}.")


def choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    """Require ``value`` to be one of ``choices`` (listed in the error)."""
    require(value in choices, key, value, f"must be one of {', '.join(choices)}")
