"""The checkpoint of a server (or a node): the latest global sum and its round.

Layout, with ``key_dir`` the caller's choice (by default the checkpoint's parent:
the server's ``run-dir``, a node's ``STATE_DIR``)::

    key_dir/checkpoint.key   32 random bytes (mode 0600), made with `secrets` on first save
    checkpoint/              mode 0700
      state.json             {"format", "round", "num-examples", "length", "fingerprint",
                              "chunks": [sha256 hex], "chunk-bytes": [int], "hmac-sha256"}
      chunk-00000.bin        one file per payload chunk (ciphertext or float64 bytes), 0600
      receipts.bin           encrypted runs: what the global sums, one receipt per upload
                             (:func:`fedtune.secure.receipt_io.receipts_to_bytes`); its SHA-256
                             and size are state.json's optional ``receipts`` field

``hmac-sha256`` is HMAC-SHA256, keyed by ``checkpoint.key``, over the canonical
JSON of every other field of ``state.json`` (sorted keys, no spaces, ASCII), so the
chunk digests cannot be replaced together with the chunks.

A new checkpoint is written to a sibling temporary directory and swapped in
with renames, so a crash leaves either the previous or the new checkpoint,
never a mix.

Loading treats every byte as untrusted (STYLE rule 13), in this order: the
directory, ``state.json`` and each chunk are opened with ``O_NOFOLLOW`` and must
be a real directory / regular files (no symlinks, FIFOs or devices);
``state.json`` is read up to :data:`MAX_STATE_BYTES` and parsed with no
``NaN``/``Infinity``, no floats, no integers longer than 32 digits and a nesting
limit; each field's type and range is checked (``round`` in 0..:data:`MAX_ROUND`,
``num-examples`` in 1..``max_examples``, ``length`` in 1..:data:`MAX_LENGTH`, a
printable ``fingerprint`` of at most :data:`MAX_FINGERPRINT` characters, 1..
:data:`MAX_CHUNKS` chunks of at most ``max_chunk_bytes`` each); then the HMAC;
then each chunk is read up to its recorded size plus one byte and its SHA-256
compared. The ``state.json`` format and its checks live in
:mod:`fedtune.run.manifest`; the no-symlink, mode-0600 file handling in
:mod:`fedtune.run.files`.

What this stops: anyone who can write to the checkpoint directory but cannot read
``checkpoint.key`` (a swapped or edited chunk, a recomputed digest, a changed
round or count, a checkpoint copied from another run with another key, files
crafted to exhaust memory, stack or time). What it does not stop: anyone who can
read ``checkpoint.key`` (the server's own user, root, a backup holding it) can
forge a checkpoint, so keep the key outside the checkpoint directory and as
private as the process itself; nor a *rollback* to an older checkpoint that was
genuinely written with the same key (a copy of an earlier round's directory
verifies). The HMAC proves who wrote a checkpoint, not that its sum is a good
model.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import CheckpointError
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.run.files import fsync_dir, open_regular, read_at_most, remove, write_new
from fedtune.run.manifest import (
    FORMAT,
    MAX_CHUNK_BYTES,
    MAX_EXAMPLES,
    MAX_STATE_BYTES,
    check_fields,
    mac,
    parse_state,
)
from fedtune.secure.codec import WirePayload
from fedtune.secure.receipt_io import receipts_from_bytes, receipts_to_bytes
from fedtune.secure.verify import Receipt

__all__ = ["KEY_NAME", "Checkpoint", "load_checkpoint", "save_checkpoint"]


KEY_NAME = "checkpoint.key"
RECEIPTS_NAME = "receipts.bin"
KEY_BYTES = 32


@dataclass(frozen=True)
class Checkpoint:
    """A completed round's global state."""

    round: int
    payload: WirePayload
    num_examples: int
    #: What the global sums (encrypted runs; empty for a plain sum or a node's copy).
    receipts: tuple[Receipt, ...] = ()


def _key_path(directory: Path, key_dir: Path | None) -> Path:
    key_dir = directory.parent if key_dir is None else Path(key_dir)
    inside = directory.resolve()
    if key_dir.resolve() == inside or inside in key_dir.resolve().parents:
        raise CheckpointError(
            f"The checkpoint key must live outside the checkpoint directory {str(directory)!r} "
            f"(got key_dir {str(key_dir)!r}): whoever can replace the checkpoint could replace "
            "the key with it."
        )
    return key_dir / KEY_NAME


def _read_key(path: Path) -> bytes:
    try:
        fd = open_regular(path, what=f"Checkpoint key {str(path)!r}", error=CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(
            f"No checkpoint key at {str(path)!r}: a checkpoint can only be loaded with the key "
            "that signed it (copy it along with the checkpoint, mode 0600)."
        ) from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise CheckpointError(
                f"Checkpoint key {str(path)!r} is open to other users (mode {mode:04o}); whoever "
                f"reads it can forge checkpoints. Run `chmod 600 {path}`."
            )
        key = read_at_most(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise CheckpointError(
            f"Checkpoint key {str(path)!r} must hold {KEY_BYTES} bytes, got {len(key)}."
        )
    return key


def _ensure_key(path: Path) -> bytes:
    """The key at ``path``, made from `secrets` (32 bytes, mode 0600) if there is none."""
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{KEY_NAME}.{secrets.token_hex(8)}")
        try:
            write_new(tmp, secrets.token_bytes(KEY_BYTES))
            with contextlib.suppress(FileExistsError):  # a concurrent writer's key wins
                os.link(tmp, path)  # atomic: never a half-written key
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    return _read_key(path)


def save_checkpoint(
    directory: Path,
    checkpoint: Checkpoint,
    *,
    key_dir: Path | None = None,
    max_examples: int = MAX_EXAMPLES,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
    keep_previous: bool = False,
) -> None:
    """Atomically replace ``directory`` with ``checkpoint``, signed with the key in ``key_dir``.

    Parameters
    ----------
    directory : Path
        The checkpoint directory (replaced; a symlink there is replaced, not followed).
    checkpoint : Checkpoint
        What to write; it must pass the checks :func:`load_checkpoint` makes.
    key_dir : Path | None
        Where ``checkpoint.key`` lives (made on first use); default ``directory.parent``.
        Never inside ``directory``.
    max_examples, max_chunk_bytes : int
        The same caps :func:`load_checkpoint` applies.
    keep_previous : bool
        Keep the checkpoint it replaces as ``<directory>.previous`` (one round back), so
        an operator can resume before a round that key holders refused.
    """
    directory = Path(directory)
    key_path = _key_path(directory, key_dir)
    chunks = list(checkpoint.payload["chunks"])
    if not all(isinstance(c, bytes) for c in chunks):
        raise CheckpointError("Checkpoint payload chunks must all be bytes.")
    manifest: dict[str, object] = {
        "format": FORMAT,
        "round": checkpoint.round,
        "num-examples": checkpoint.num_examples,
        "length": checkpoint.payload["length"],
        "fingerprint": checkpoint.payload["fingerprint"],
        "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
        "chunk-bytes": [len(c) for c in chunks],
        "hmac-sha256": "0" * 64,
    }
    receipts = receipts_to_bytes(checkpoint.receipts) if checkpoint.receipts else b""
    if receipts:
        manifest["receipts"] = [hashlib.sha256(receipts).hexdigest(), len(receipts)]
    where = f"the checkpoint to write to {str(directory)!r}"
    check_fields(manifest, where, max_examples=max_examples, max_chunk_bytes=max_chunk_bytes)
    manifest["hmac-sha256"] = mac(_ensure_key(key_path), manifest)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    remove(tmp)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)
    for i, chunk in enumerate(chunks):
        write_new(tmp / f"chunk-{i:05d}.bin", chunk)
    if receipts:
        write_new(tmp / RECEIPTS_NAME, receipts)
    write_new(tmp / "state.json", json.dumps(manifest, indent=1).encode("ascii"))
    fsync_dir(tmp)
    remove(old)
    if os.path.lexists(directory):
        directory.rename(old)
    tmp.rename(directory)
    fsync_dir(directory.parent)
    if keep_previous and os.path.isdir(old) and not os.path.islink(old):
        previous = directory.with_name(directory.name + ".previous")
        remove(previous)
        old.rename(previous)
        fsync_dir(directory.parent)
    remove(old)


def load_checkpoint(
    directory: Path,
    *,
    key_dir: Path | None = None,
    max_examples: int = MAX_EXAMPLES,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    directory : Path
        The checkpoint directory; it, ``state.json`` and the chunks must not be symlinks.
    key_dir : Path | None
        Where ``checkpoint.key`` lives; default ``directory.parent``. It is never created here.
    max_examples : int
        Largest ``num-examples`` accepted.
    max_chunk_bytes : int
        Largest chunk accepted; no more than its recorded size plus one byte is ever read.

    Raises
    ------
    CheckpointError
        Missing, damaged, out of range, not signed with this key, or not regular files;
        the message names the field or file and what it held.
    """
    directory = Path(directory)
    key_path = _key_path(directory, key_dir)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        old = directory.with_name(directory.name + ".old")
        hint = f" (an interrupted write left {str(old)!r})" if old.is_dir() else ""
        raise CheckpointError(f"No checkpoint at {str(directory)!r}{hint}.") from None
    except OSError as err:
        raise CheckpointError(
            f"Checkpoint {str(directory)!r} is a symlink or not a directory ({err.strerror})."
        ) from err
    try:
        return _load(dir_fd, directory, key_path, max_examples, max_chunk_bytes)
    finally:
        os.close(dir_fd)


def _read_member(dir_fd: int, name: str, limit: int, what: str) -> tuple[bytes, int]:
    """At most ``limit`` bytes of ``name`` under ``dir_fd`` and its size on disk."""
    fd = open_regular(name, dir_fd=dir_fd, what=what, error=CheckpointError)
    try:
        return read_at_most(fd, limit), os.fstat(fd).st_size
    finally:
        os.close(fd)


def _load(
    dir_fd: int, directory: Path, key_path: Path, max_examples: int, max_chunk_bytes: int
) -> Checkpoint:
    where = f"state.json in {str(directory)!r}"
    try:
        raw, _ = _read_member(dir_fd, "state.json", MAX_STATE_BYTES + 1, where)
    except FileNotFoundError:
        raise CheckpointError(f"No checkpoint at {str(directory)!r} (no state.json).") from None
    if len(raw) > MAX_STATE_BYTES:
        raise CheckpointError(f"{where} is larger than {MAX_STATE_BYTES} bytes.")
    manifest = parse_state(raw, where)
    fields = check_fields(
        manifest, where, max_examples=max_examples, max_chunk_bytes=max_chunk_bytes
    )
    expected = mac(_read_key(key_path), manifest)
    if not hmac.compare_digest(expected, str(manifest["hmac-sha256"])):
        raise CheckpointError(
            f"Checkpoint {str(directory)!r}: its HMAC does not match the key "
            f"{str(key_path)!r}; state.json was changed or written with another key."
        )
    chunks = []
    for i, (digest, size) in enumerate(zip(fields.digests, fields.sizes, strict=True)):
        name = f"chunk-{i:05d}.bin"
        what = f"Checkpoint chunk {i} ({str(directory / name)!r})"
        try:
            data, on_disk = _read_member(dir_fd, name, size + 1, what)
        except FileNotFoundError:
            raise CheckpointError(f"{what} is missing.") from None
        if len(data) != size:
            raise CheckpointError(
                f"{what} holds {max(on_disk, len(data))} bytes, not the {size} recorded."
            )
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), digest):
            raise CheckpointError(f"{what} does not match its digest: it was changed.")
        chunks.append(data)
    payload: WirePayload = {
        "chunks": chunks,
        "length": fields.length,
        "fingerprint": fields.fingerprint,
    }
    receipts: tuple[Receipt, ...] = ()
    if fields.receipts is not None:
        digest, size = fields.receipts
        what = f"Checkpoint receipts ({str(directory / RECEIPTS_NAME)!r})"
        try:
            data, on_disk = _read_member(dir_fd, RECEIPTS_NAME, size + 1, what)
        except FileNotFoundError:
            raise CheckpointError(f"{what} are missing.") from None
        if len(data) != size or not hmac.compare_digest(hashlib.sha256(data).hexdigest(), digest):
            raise CheckpointError(f"{what} do not match their recorded size and digest.")
        try:
            receipts = tuple(receipts_from_bytes(data))
        except PayloadError as err:
            raise CheckpointError(f"{what}: {err}") from err
    return Checkpoint(
        round=fields.round,
        payload=payload,
        num_examples=fields.num_examples,
        receipts=receipts,
    )
