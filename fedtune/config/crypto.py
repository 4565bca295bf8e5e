"""Encrypted aggregation (``encryption``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CryptoConfig"]


@dataclass(frozen=True)
class CryptoConfig:
    """Encrypted aggregation.

    With ``encryption = true`` clients send CKKS ciphertexts of ``n_k w_k`` and
    the server adds them with a public context (no secret key). A simulation
    makes fresh keys per run in ``RUN_DIR/keys``; a deployment uses
    ``fedtune keygen``.
    """

    encryption: bool = False
