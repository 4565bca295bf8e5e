"""What travels between clients and server, encrypted or not, through one interface.

An update is the pre-scaled adapter vector ``n_k w_k`` (see
:mod:`fedtune.aggregation`). A :class:`Codec` turns it into a *wire payload* of
plain types (``chunks: list[bytes]``, ``length: int``, ``fingerprint: str``) that
fits a Flower ``ConfigRecord``, checks untrusted payloads before deserialising
anything, adds payloads, and (for a key holder) decodes them back to numbers.

* :class:`PlainCodec`: the chunk is the float64 vector's bytes; anyone can decode.
* :class:`CkksCodec`: CKKS ciphertexts (:mod:`fedtune.crypto`); a codec built on
  a public context can validate and add, but not encode or decode.

The server-side strategy only ever calls :meth:`Codec.validate` and
:meth:`Codec.add`, so encryption on or off is one switch and both go through the
same strategy code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedtune import crypto

WirePayload = dict[str, Any]

PLAIN_FINGERPRINT_PREFIX = "plain:"


class PayloadError(crypto.PayloadError):
    """An untrusted payload is malformed; the message names the field and value."""


class Codec(Protocol):
    """Encode / validate / add / decode adapter updates."""

    fingerprint: str

    def encode(self, vector: NDArray[np.floating]) -> WirePayload:
        """Wire payload of a (pre-scaled) vector."""
        ...

    def validate(self, payload: object, *, aggregate: bool = False) -> WirePayload:
        """Check an untrusted payload; raise :class:`PayloadError` if it is bad."""
        ...

    def add(self, payloads: Sequence[WirePayload]) -> WirePayload:
        """Sum validated payloads (no secret needed)."""
        ...

    def decode(self, payload: WirePayload) -> NDArray[np.float64]:
        """Plain numbers of a payload (a key holder only, when encrypted)."""
        ...


def _check_common(payload: object, *, fingerprint: str, length: int) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise PayloadError(f"payload must be a mapping, got {type(payload).__name__}.")
    if set(payload) != {"chunks", "length", "fingerprint"}:
        raise PayloadError(
            f"payload keys must be chunks, length, fingerprint; got {sorted(map(str, payload))}."
        )
    if payload["fingerprint"] != fingerprint:
        raise PayloadError(
            f"payload fingerprint {str(payload['fingerprint'])[:24]!r} does not match this "
            f"run's {fingerprint[:24]!r}: the sender holds a different key or model layout."
        )
    if type(payload["length"]) is not int or payload["length"] != length:
        raise PayloadError(f"payload length must be {length}, got {payload['length']!r}.")
    chunks = payload["chunks"]
    if not isinstance(chunks, list) or not all(isinstance(c, bytes) for c in chunks):
        raise PayloadError("payload chunks must be a list of bytes.")
    return payload


class PlainCodec:
    """Unencrypted float64 updates (the baseline, and runs with encryption off).

    The fingerprint binds payloads to the adapter length so that a client with
    another model layout is rejected the same way a wrong key is.
    """

    def __init__(self, *, length: int) -> None:
        self.length = length
        self.fingerprint = (
            PLAIN_FINGERPRINT_PREFIX + hashlib.sha256(f"float64:{length}".encode()).hexdigest()[:32]
        )

    def encode(self, vector: NDArray[np.floating]) -> WirePayload:
        vec = np.ascontiguousarray(vector, dtype="<f8")
        if vec.shape != (self.length,):
            raise PayloadError(f"vector shape must be ({self.length},), got {vec.shape}.")
        return {"chunks": [vec.tobytes()], "length": self.length, "fingerprint": self.fingerprint}

    def validate(self, payload: object, *, aggregate: bool = False) -> WirePayload:
        checked = _check_common(payload, fingerprint=self.fingerprint, length=self.length)
        chunks = checked["chunks"]
        if len(chunks) != 1 or len(chunks[0]) != 8 * self.length:
            sizes = [len(c) for c in chunks]
            raise PayloadError(
                f"plain payload must be one chunk of {8 * self.length} bytes, got sizes {sizes}."
            )
        if not np.isfinite(np.frombuffer(chunks[0], dtype="<f8")).all():
            raise PayloadError("plain payload holds NaN or infinite values.")
        return dict(checked)

    def add(self, payloads: Sequence[WirePayload]) -> WirePayload:
        if not payloads:
            raise PayloadError("no payloads to add.")
        total = np.zeros(self.length, dtype=np.float64)
        for p in payloads:
            total += np.frombuffer(p["chunks"][0], dtype="<f8")
        return self.encode(total)

    def decode(self, payload: WirePayload) -> NDArray[np.float64]:
        return np.frombuffer(payload["chunks"][0], dtype="<f8").astype(np.float64)


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
        _check_common(payload, fingerprint=self.fingerprint, length=self.length)
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


def payload_nbytes(payload: WirePayload) -> int:
    """Bytes of ciphertext / plaintext data in a payload."""
    return int(sum(len(c) for c in payload["chunks"]))
