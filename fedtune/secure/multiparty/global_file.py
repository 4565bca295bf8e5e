"""``RUN_DIR/multiparty-global.json``: the checkpointed ``ckks-multiparty`` round's
receipts, count, quorum and signed partial decryptions, kept by the server
(:mod:`fedtune.apps.server.multiparty`) so that ``fedtune export`` opens the checkpoint
without any key and without a second decryption. Untrusted when read: every field is
checked (signatures, receipts, count) where it is opened.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path

from fedtune.errors import FederationError

__all__ = ["GLOBAL_FILE", "MAX_BYTES", "load_global_record", "write_global_record"]

#: The checkpointed round's receipts, quorum and signed partials (export opens it).
GLOBAL_FILE = "multiparty-global.json"
#: The largest file read back (partials of a large adapter and quorum, with room).
MAX_BYTES = 256 * 2**20


def write_global_record(run_dir: Path, doc: Mapping[str, object]) -> None:
    """Write ``doc`` (bytes as base64) to ``run_dir/GLOBAL_FILE`` atomically."""
    text = json.dumps({k: _enc(v) for k, v in doc.items()}, sort_keys=True)
    tmp = run_dir / (GLOBAL_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, run_dir / GLOBAL_FILE)


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
    path = run_dir / GLOBAL_FILE
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        doc = json.loads(raw)
    except (OSError, ValueError) as err:
        raise FederationError(
            f"{str(path)!r} (the multiparty round's signed partials) is missing or not JSON "
            f"({err}); export needs it."
        ) from err
    if not isinstance(doc, dict):
        raise FederationError(f"{str(path)!r} is not a JSON object.")
    return {str(k): _dec(v) for k, v in doc.items()}
