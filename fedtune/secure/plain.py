"""The ``plain`` backend: unencrypted float64 updates (encryption off, and the baseline)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedtune.errors import WirePayloadError as PayloadError
from fedtune.secure.codec import Codec, WirePayload, check_common

__all__ = ["PLAIN_FINGERPRINT_PREFIX", "PlainBackend", "PlainCodec"]

PLAIN_FINGERPRINT_PREFIX = "plain:"


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
        checked = check_common(payload, fingerprint=self.fingerprint, length=self.length)
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


class PlainBackend:
    """No keys; every party can encode and decode."""

    name = "plain"
    uses_keys = False

    def make_keys(self, directory: Path) -> None:
        """Nothing to make."""
        return None

    def codec(self, *, length: int, context: Path | None = None, public: bool = False) -> Codec:
        """A :class:`PlainCodec` (``context`` and ``public`` do not apply)."""
        return PlainCodec(length=length)
