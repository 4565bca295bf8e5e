"""Encrypted aggregation (``encryption``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CryptoConfig"]


@dataclass(frozen=True)
class CryptoConfig:
    """Encrypted aggregation.

    With ``encryption = true`` clients send ciphertexts of ``n_k w_k`` from the
    ``encryption-backend`` (default ``ckks``: CKKS, :mod:`fedtune.secure`) and the
    server adds them with a public context (no secret key). A simulation makes
    fresh keys per run in ``RUN_DIR/keys``; a deployment uses ``fedtune keygen``.
    The backend's name is checked against the registry by :func:`fedtune.resolve.resolve`.
    """

    encryption: bool = field(
        default=False,
        metadata={
            "help": "Encrypted aggregation: clients send ciphertexts the server adds without "
            "a secret key (a simulation makes fresh keys in `RUN_DIR/keys/`)."
        },
    )
    encryption_backend: str = field(
        default="ckks",
        metadata={
            "help": "The codec backend used when `encryption = true`: `ckks`, `ckks-multiparty` "
            "(no shared key: each node makes its own in a ceremony before round 1, "
            "docs/multiparty.md), or one you "
            "register (docs/architecture.md)."
        },
    )

    @property
    def codec_name(self) -> str:
        """The backend every party's codec comes from: ``plain`` with encryption off."""
        return self.encryption_backend if self.encryption else "plain"
