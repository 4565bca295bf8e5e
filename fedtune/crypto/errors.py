"""Exception types of :mod:`fedtune.crypto`."""

from __future__ import annotations

from fedtune.errors import FedtuneError

__all__ = ["CryptoError", "PayloadError"]


class CryptoError(FedtuneError):
    """A cryptographic operation cannot be carried out with what it was given.

    Raised, for example, when a context without the secret key is asked to
    decrypt or encrypt, or when a key file is malformed.
    """


class PayloadError(CryptoError, ValueError):
    """Untrusted input (a client reply, a wire dictionary) is malformed.

    The message names the offending field and the value that came. The
    server drops such a reply from the round; it never crashes on one.
    """
