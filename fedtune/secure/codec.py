"""What travels between clients and server, encrypted or not: one interface for every backend.

An update is the pre-scaled adapter vector ``n_k w_k`` (see
:mod:`fedtune.aggregation`). A :class:`Codec` turns it into a *wire payload* of
plain types (``chunks: list[bytes]``, ``length: int``, ``fingerprint: str``) that
fits a Flower ``ConfigRecord``, checks untrusted payloads before deserialising
anything, adds payloads, and (for a key holder) decodes them back to numbers.

Backends (:mod:`fedtune.secure`, chosen by name): ``plain``
(:class:`~fedtune.secure.plain.PlainCodec`, the float64 vector's bytes; anyone can
decode) and ``ckks`` (:class:`~fedtune.secure.ckks.CkksCodec`, CKKS ciphertexts from
:mod:`fedtune.crypto`; a codec on a public context can validate and add, but not
encode or decode).

The server-side strategy only ever calls :meth:`Codec.validate` and
:meth:`Codec.add`, so every backend goes through the same strategy code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedtune.errors import WirePayloadError as PayloadError

__all__ = ["Codec", "PayloadError", "WirePayload", "check_common", "payload_nbytes"]

WirePayload = dict[str, Any]


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


def check_common(payload: object, *, fingerprint: str, length: int) -> Mapping[str, Any]:
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


def payload_nbytes(payload: WirePayload) -> int:
    """Bytes of ciphertext / plaintext data in a payload."""
    return int(sum(len(c) for c in payload["chunks"]))
