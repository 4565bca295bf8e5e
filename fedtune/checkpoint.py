"""The server's checkpoint: the latest global sum (encrypted or plain) and its round.

Layout of ``checkpoint/``::

    state.json        {"round", "num-examples", "length", "fingerprint", "chunks": [sha256...]}
    chunk-00000.bin   one file per payload chunk (ciphertext or float64 bytes)

A new checkpoint is written to a sibling temporary directory and swapped in
with renames, so a crash leaves either the previous or the new checkpoint,
never a mix. Loading re-checks every chunk's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedtune.wire import WirePayload


class CheckpointError(ValueError):
    """A checkpoint is missing or damaged."""


@dataclass(frozen=True)
class Checkpoint:
    """A completed round's global state."""

    round: int
    payload: WirePayload
    num_examples: int


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    """Atomically replace ``directory`` with ``checkpoint``."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    digests = []
    for i, chunk in enumerate(checkpoint.payload["chunks"]):
        path = tmp / f"chunk-{i:05d}.bin"
        path.write_bytes(chunk)
        digests.append(hashlib.sha256(chunk).hexdigest())
    manifest = {
        "round": checkpoint.round,
        "num-examples": checkpoint.num_examples,
        "length": checkpoint.payload["length"],
        "fingerprint": checkpoint.payload["fingerprint"],
        "chunks": digests,
    }
    with (tmp / "state.json").open("w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`."""
    directory = Path(directory)
    manifest_path = directory / "state.json"
    if not manifest_path.is_file():
        old = directory.with_name(directory.name + ".old")
        hint = f" (an interrupted write left {str(old)!r})" if old.is_dir() else ""
        raise CheckpointError(f"No checkpoint at {str(directory)!r}{hint}.")
    try:
        manifest = json.loads(manifest_path.read_text())
        chunks = []
        for i, digest in enumerate(manifest["chunks"]):
            data = (directory / f"chunk-{i:05d}.bin").read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise CheckpointError(f"Checkpoint chunk {i} in {str(directory)!r} is corrupted.")
            chunks.append(data)
        payload: WirePayload = {
            "chunks": chunks,
            "length": int(manifest["length"]),
            "fingerprint": str(manifest["fingerprint"]),
        }
        return Checkpoint(
            round=int(manifest["round"]),
            payload=payload,
            num_examples=int(manifest["num-examples"]),
        )
    except (KeyError, TypeError, ValueError, OSError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"Checkpoint in {str(directory)!r} is damaged: {err}") from err
