"""Encrypted aggregation (``encryption``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.config._checks import choice

__all__ = ["CryptoConfig"]


@dataclass(frozen=True)
class CryptoConfig:
    """Encrypted aggregation.

    With ``encryption = true`` clients send ciphertexts of ``n_k w_k`` from the
    ``encryption-backend`` (default ``ckks``: CKKS, :mod:`fedtune.secure`) and the
    server adds them with a public context (no secret key). A simulation makes
    fresh keys per run in ``RUN_DIR/keys``; a deployment uses ``fedtune keygen``.
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
            "help": "The codec backend used when `encryption = true`: `ckks`, or one you "
            "register (docs/architecture.md)."
        },
    )

    def __post_init__(self) -> None:
        from fedtune.secure import backend_names  # noqa: PLC0415 - registry, no cycle at import

        names = tuple(n for n in backend_names() if n != "plain")
        choice("encryption-backend", self.encryption_backend, names)

    @property
    def codec_name(self) -> str:
        """The backend every party's codec comes from: ``plain`` with encryption off."""
        return self.encryption_backend if self.encryption else "plain"
