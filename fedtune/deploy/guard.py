"""Checks that keep a SuperLink's directories free of what the threat model keeps elsewhere.

The server is honest-but-curious: whatever sits on its disk, it can read. Two
files must therefore never be there, and ``fedtune deploy superlink`` refuses to
start when it finds either in its certificate or state directory:

* a CKKS context that holds the **secret key** (``fedtune keygen``'s
  ``secret.ctx``): with it the server decrypts every update. Only
  ``public.ctx`` belongs on the server.
* the deployment **CA's private key**: with it whoever holds the SuperLink mints
  a certificate for any name and impersonates the server to every node.

Both checks read only a file's first bytes with plain Python (a header line, a
PEM marker); no native library parses what they find.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedtune.errors import ConfigError

#: How much of each file is read: a CKKS context's header line fits in 4096 bytes.
_HEAD_BYTES = 4096
#: PEM private keys are a few kilobytes; bigger files are not keys.
_MAX_PEM_BYTES = 64 * 1024
#: Stop walking a directory tree after this many files (a state dir holds a few dozen).
_MAX_FILES = 20_000


def _files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (symbolic links followed to files, not directories)."""
    count = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file():
                count += 1
                if count > _MAX_FILES:
                    return
                yield path


def _head(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


def is_secret_context(path: Path) -> bool:
    """Whether ``path`` is a CKKS context file that announces a secret key.

    It reads the header line of :func:`fedtune.crypto.context.context_to_bytes`
    (``"secret_key_bytes": N``) and counts any N > 0 as secret, even if the key
    after it is damaged: what matters is that it may be there.
    """
    head = _head(path, _HEAD_BYTES)
    end = head.find(b"\n")
    if end < 0 or not head.startswith(b"{"):
        return False
    try:
        header = json.loads(head[:end])
    except ValueError:
        return False
    if not isinstance(header, dict) or "key_id" not in header:
        return False
    n_sk = header.get("secret_key_bytes")
    return not isinstance(n_sk, int) or n_sk != 0


def _is_ca_key(path: Path, ca_public: bytes | None) -> bool:
    if path.name == "ca.key":
        return True
    if ca_public is None or path.stat().st_size > _MAX_PEM_BYTES:
        return False
    data = _head(path, _MAX_PEM_BYTES)
    if b"PRIVATE KEY-----" not in data:
        return False
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return False
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public == ca_public


def check_superlink_dirs(*, certs: Path, state_dir: Path) -> None:
    """Raise :class:`ConfigError` if a secret CKKS context or the CA key is in either dir."""
    ca_public: bytes | None = None
    try:
        ca_public = (
            x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    except (OSError, ValueError):
        ca_public = None
    for root, option in ((certs, "--certs"), (state_dir, "--state-dir")):
        if not root.is_dir():
            continue
        for path in _files(root):
            if is_secret_context(path):
                raise ConfigError(
                    f"{path} is a CKKS context with the secret key, in the SuperLink's "
                    f"{option}; the server must never hold it (it would decrypt every update). "
                    "Move it to the key holders' machines and give the server only public.ctx."
                )
            if _is_ca_key(path, ca_public):
                raise ConfigError(
                    f"{path} is the deployment CA's private key, in the SuperLink's {option}; "
                    "whoever holds the SuperLink could then sign certificates for any address. "
                    "Keep it offline (`fedtune deploy certs --ca-dir`) and leave only ca.crt, "
                    "server.pem and server.key here."
                )
