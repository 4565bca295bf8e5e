"""The one root of fedtune's errors: every error a user can cause is a :class:`FedtuneError`.

The ``fedtune`` console script catches :class:`FedtuneError` and prints its message
(exit 2; :class:`FederationError`, a run that stopped, exits 1), so no user error
ends in a traceback. Each module keeps its own subclass (``ConfigError``,
``CryptoError``, ``BoundError``, ...) next to the code that raises it; the built-in
base each had before (``ValueError``, ``RuntimeError``) is kept as a second base so
callers that catch those still work.
"""

from __future__ import annotations

__all__ = ["FederationError", "FedtuneError"]


class FedtuneError(Exception):
    """Something fedtune was asked to do cannot be done; the message says what and why."""


class FederationError(FedtuneError, RuntimeError):
    """A federated run cannot go on (e.g. too few clients took part)."""
