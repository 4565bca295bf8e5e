"""The server's two multiparty files in the run directory (both untrusted when read:
every field is checked where it is used).

``RUN_DIR/multiparty-global.json``
    The checkpointed ``ckks-multiparty`` round's receipts, count, quorum and signed
    partial decryptions, kept by the server (:mod:`fedtune.apps.server.multiparty`) so
    that ``fedtune export`` opens the checkpoint without any key and without a second
    decryption, and a resumed server sends the same global again.
``RUN_DIR/multiparty-pending.json``
    The decryption request of the round being decrypted (receipts, count, round,
    quorum) and its encrypted sum, written before the first ``decrypt`` message leaves:
    a server that stops before the quorum has answered asks exactly that request again
    when resumed (key holders answer it from their round logs with the same bytes),
    never another one for that round.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path

from fedtune.errors import FederationError

__all__ = [
    "GLOBAL_FILE",
    "MAX_BYTES",
    "PENDING_DECRYPTION",
    "has_pending_decryption",
    "load_global_record",
    "load_pending_decryption",
    "write_global_record",
    "write_pending_decryption",
]

#: The checkpointed round's receipts, quorum and signed partials (export opens it).
GLOBAL_FILE = "multiparty-global.json"
#: The request (and sum) of the round being decrypted, saved before it is sent.
PENDING_DECRYPTION = "multiparty-pending.json"
#: The largest file read back (partials of a large adapter and quorum, with room).
MAX_BYTES = 256 * 2**20


def write_global_record(run_dir: Path, doc: Mapping[str, object]) -> None:
    """Write ``doc`` (bytes as base64) to ``run_dir/GLOBAL_FILE`` atomically."""
    _write(run_dir / GLOBAL_FILE, doc)


def write_pending_decryption(run_dir: Path, doc: Mapping[str, object]) -> None:
    """Write ``doc`` to ``run_dir/PENDING_DECRYPTION`` atomically and durably."""
    _write(run_dir / PENDING_DECRYPTION, doc)


def _write(path: Path, doc: Mapping[str, object]) -> None:
    text = json.dumps({k: _enc(v) for k, v in doc.items()}, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _enc(value: object) -> object:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_enc(v) for v in value]
    return value


def _dec(value: object) -> object:
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        return base64.b64decode(value["b64"], validate=True)
    if isinstance(value, list):
        return [_dec(v) for v in value]
    return value


def load_global_record(run_dir: Path) -> Mapping[str, object]:
    """The record :func:`write_global_record` kept (untrusted: checked when opened)."""
    return _load(run_dir / GLOBAL_FILE, "the multiparty round's signed partials")


def has_pending_decryption(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a saved decryption request (answered or not)."""
    return (run_dir / PENDING_DECRYPTION).is_file()


def load_pending_decryption(run_dir: Path) -> Mapping[str, object] | None:
    """The request :func:`write_pending_decryption` kept, or ``None`` if there is none."""
    path = run_dir / PENDING_DECRYPTION
    if not path.exists() and not path.is_symlink():
        return None
    return _load(path, "the multiparty decryption request being asked")


def _load(path: Path, what: str) -> Mapping[str, object]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        doc = json.loads(raw)
    except (OSError, ValueError) as err:
        raise FederationError(
            f"{str(path)!r} ({what}) is missing or not JSON ({err}); restore the file the "
            "server wrote."
        ) from err
    if not isinstance(doc, dict):
        raise FederationError(f"{str(path)!r} is not a JSON object.")
    return {str(k): _dec(v) for k, v in doc.items()}
