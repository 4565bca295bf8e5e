"""The ``ckks`` backend: CKKS-encrypted updates (TenSEAL/SEAL through :mod:`fedtune.crypto`).

The key holder makes a secret context and its public half (:meth:`CkksBackend.make_keys`);
clients encode and decode with the secret one, the server validates and adds with
the public one (it cannot decrypt).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedtune import crypto
from fedtune.errors import ConfigError
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.secure.codec import Codec, WirePayload, check_common

__all__ = ["CkksBackend", "CkksCodec"]


class CkksCodec:
    """CKKS-encrypted updates; see :mod:`fedtune.crypto` for parameters and sizes."""

    def __init__(self, context: crypto.CkksContext, *, length: int) -> None:
        self.context = context
        self.length = length
        self.fingerprint = crypto.fingerprint(context)

    @property
    def can_decrypt(self) -> bool:
        """True for a key holder's codec."""
        return crypto.has_secret_key(self.context)

    def encode(self, vector: NDArray[np.floating]) -> WirePayload:
        vec = np.asarray(vector, dtype=np.float64)
        if vec.shape != (self.length,):
            raise PayloadError(f"vector shape must be ({self.length},), got {vec.shape}.")
        return crypto.encrypt_vector(self.context, vec).to_wire()

    def validate(self, payload: object, *, aggregate: bool = False) -> WirePayload:
        check_common(payload, fingerprint=self.fingerprint, length=self.length)
        try:
            enc = crypto.validate_encrypted(
                self.context, payload, length=self.length, aggregate=aggregate
            )
        except crypto.PayloadError as err:
            raise PayloadError(str(err)) from err
        return enc.to_wire()

    def add(self, payloads: Sequence[WirePayload]) -> WirePayload:
        if not payloads:
            raise PayloadError("no payloads to add.")
        # Cannot fail on payloads that passed validate (see crypto.sum_encrypted);
        # anything else is refused as a PayloadError, never handed to SEAL unchecked.
        try:
            items = [crypto.EncryptedVector.from_wire(p) for p in payloads]
            return crypto.sum_encrypted(self.context, items).to_wire()
        except ValueError as err:  # crypto.PayloadError included
            raise PayloadError(str(err)) from err

    def decode(self, payload: WirePayload) -> NDArray[np.float64]:
        # decrypt_vector parses every chunk itself before SEAL sees it, so a payload
        # that skipped validate still cannot crash the process.
        try:
            return crypto.decrypt_vector(self.context, crypto.EncryptedVector.from_wire(payload))
        except crypto.PayloadError as err:
            raise PayloadError(str(err)) from err


class CkksBackend:
    """Fresh CKKS keys per run; a codec on the secret or the public context."""

    name = "ckks"
    uses_keys = True

    def make_keys(self, directory: Path) -> crypto.KeyFiles:
        """A new secret context and its public half in ``directory`` (see ``save_keys``)."""
        return crypto.save_keys(crypto.make_secret_context(), directory)

    def codec(self, *, length: int, context: Path | None = None, public: bool = False) -> Codec:
        """A :class:`CkksCodec` on the context file at ``context``.

        ``public``: the caller (the server) must hold only the public context; a
        context with the secret key is refused.
        """
        if context is None:
            raise ConfigError(
                "`encryption` is on but no CKKS context was given; a client needs "
                "`secret-context`, the server `public-context`."
            )
        loaded = crypto.load_context(Path(context), public=public)
        if public and crypto.has_secret_key(loaded):
            raise crypto.CryptoError(
                f"`public-context` {str(context)!r} holds a secret key; the server must only "
                "get the public context (public.ctx from `fedtune keygen`)."
            )
        return CkksCodec(loaded, length=length)
