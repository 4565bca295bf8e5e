"""The checkpoint of a server (or a node): the latest global sum and its round.

Layout, with ``key_dir`` the caller's choice (by default the checkpoint's parent:
the server's ``run-dir``, a node's ``STATE_DIR``)::

    key_dir/checkpoint.key   32 random bytes (mode 0600), made with `secrets` on first save
    checkpoint/              mode 0700
      state.json             {"format", "round", "num-examples", "length", "fingerprint",
                              "chunks": [sha256 hex], "chunk-bytes": [int], "hmac-sha256"}
      chunk-00000.bin        one file per payload chunk (ciphertext or float64 bytes), 0600

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
compared.

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
import errno
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.secure.codec import WirePayload

FORMAT = "fedtune-checkpoint-2"
KEY_NAME = "checkpoint.key"
KEY_BYTES = 32
MAX_STATE_BYTES = 1 << 20
MAX_ROUND = 10**6
MAX_EXAMPLES = 10**9
MAX_LENGTH = 10**9
MAX_FINGERPRINT = 256
MAX_CHUNKS = 4096
MAX_CHUNK_BYTES = 256 << 20  # a plain float64 adapter of 33M parameters

_FIELDS = (
    "format",
    "round",
    "num-examples",
    "length",
    "fingerprint",
    "chunks",
    "chunk-bytes",
    "hmac-sha256",
)
_HEX = frozenset("0123456789abcdef")
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO can't hang
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class CheckpointError(FedtuneError, ValueError):
    """A checkpoint is missing, damaged, or not written with this key."""


@dataclass(frozen=True)
class Checkpoint:
    """A completed round's global state."""

    round: int
    payload: WirePayload
    num_examples: int


class _Literal:
    """A JSON number or constant that no field accepts (kept as text for the error)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text if len(self.text) <= 40 else self.text[:40] + "..."


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _is_hex_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _int_field(value: object, label: str, low: int, high: int, where: str) -> int:
    if type(value) is not int or not low <= value <= high:  # `type`: True is no count
        raise CheckpointError(
            f"Checkpoint field {label} must be an integer in {low}..{high}; got {_show(value)} "
            f"(in {where})."
        )
    return value


@dataclass(frozen=True)
class _Fields:
    """``state.json`` after its types and ranges passed (its HMAC not yet checked)."""

    round: int
    num_examples: int
    length: int
    fingerprint: str
    digests: list[str]
    sizes: list[int]


def _check_fields(
    manifest: dict[str, object], where: str, *, max_examples: int, max_chunk_bytes: int
) -> _Fields:
    """Check every field's type and range (not the HMAC); raise CheckpointError naming it."""
    missing = [k for k in _FIELDS if k not in manifest]
    unexpected = [_show(k) for k in manifest if k not in _FIELDS][:5]
    if missing or unexpected:
        found = [f"missing {', '.join(map(repr, missing))}"] if missing else []
        found += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        legacy = (
            "; a checkpoint written before fedtune signed its checkpoints cannot be resumed"
            if "hmac-sha256" in missing
            else ""
        )
        raise CheckpointError(
            f"{where} fields must be exactly {', '.join(_FIELDS)}; {'; '.join(found)}{legacy}."
        )
    if manifest["format"] != FORMAT:
        raise CheckpointError(
            f"Checkpoint field `format` must be {FORMAT!r}; got {_show(manifest['format'])} "
            f"(in {where})."
        )
    round_ = _int_field(manifest["round"], "`round`", 0, MAX_ROUND, where)
    examples = _int_field(manifest["num-examples"], "`num-examples`", 1, max_examples, where)
    length = _int_field(manifest["length"], "`length`", 1, MAX_LENGTH, where)
    fingerprint = manifest["fingerprint"]
    if not (
        isinstance(fingerprint, str)
        and len(fingerprint) <= MAX_FINGERPRINT
        and fingerprint.isascii()
        and fingerprint.isprintable()
    ):
        raise CheckpointError(
            f"Checkpoint field `fingerprint` must be printable ASCII of at most "
            f"{MAX_FINGERPRINT} characters; got {_show(fingerprint)} (in {where})."
        )
    chunks = manifest["chunks"]
    if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS:
        got = f"{len(chunks)} entries" if isinstance(chunks, list) else _show(chunks)
        raise CheckpointError(
            f"Checkpoint field `chunks` must be a list of 1..{MAX_CHUNKS} SHA-256 hex digests; "
            f"got {got} (in {where})."
        )
    digests: list[str] = []
    for i, digest in enumerate(chunks):
        if isinstance(digest, str) and _is_hex_digest(digest):
            digests.append(digest)
        else:
            raise CheckpointError(
                f"Checkpoint field `chunks` entry {i} must be a SHA-256 hex digest; "
                f"got {_show(digest)} (in {where})."
            )
    sizes = manifest["chunk-bytes"]
    if not isinstance(sizes, list) or len(sizes) != len(chunks):
        got = f"{len(sizes)} entries" if isinstance(sizes, list) else _show(sizes)
        raise CheckpointError(
            f"Checkpoint field `chunk-bytes` must be a list of {len(chunks)} sizes, one per "
            f"chunk; got {got} (in {where})."
        )
    ints = [
        _int_field(size, f"`chunk-bytes` entry {i}", 0, max_chunk_bytes, where)
        for i, size in enumerate(sizes)
    ]
    if not _is_hex_digest(manifest["hmac-sha256"]):
        raise CheckpointError(
            f"Checkpoint field `hmac-sha256` must be a hex digest; "
            f"got {_show(manifest['hmac-sha256'])} (in {where})."
        )
    return _Fields(round_, examples, length, fingerprint, digests, ints)


def _mac(key: bytes, manifest: dict[str, object]) -> str:
    """HMAC-SHA256 over the canonical JSON of every field but the HMAC itself."""
    fields = {k: v for k, v in manifest.items() if k != "hmac-sha256"}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, body.encode("ascii"), hashlib.sha256).hexdigest()


def _open_regular(path: str, *, dir_fd: int | None, what: str) -> int:
    """Open ``path`` for reading; refuse symlinks and anything but a regular file."""
    try:
        fd = os.open(path, _READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise CheckpointError(f"{what} is a symlink or not a regular file.") from err
        raise CheckpointError(f"{what} cannot be opened: {err}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{what} is a symlink or not a regular file.")
    return fd


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd`` (callers pass cap + 1 to detect an overrun)."""
    parts, left = [], limit
    while left > 0:
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


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
        fd = _open_regular(str(path), dir_fd=None, what=f"Checkpoint key {str(path)!r}")
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
        key = _read_at_most(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise CheckpointError(
            f"Checkpoint key {str(path)!r} must hold {KEY_BYTES} bytes, got {len(key)}."
        )
    return key


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, _CREATE, 0o600)
    try:
        os.fchmod(fd, 0o600)  # explicit, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_key(path: Path) -> bytes:
    """The key at ``path``, made from `secrets` (32 bytes, mode 0600) if there is none."""
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{KEY_NAME}.{secrets.token_hex(8)}")
        try:
            _write_file(tmp, secrets.token_bytes(KEY_BYTES))
            with contextlib.suppress(FileExistsError):  # a concurrent writer's key wins
                os.link(tmp, path)  # atomic: never a half-written key
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    return _read_key(path)


def _remove(path: Path) -> None:
    """Remove ``path`` without following a symlink (a link is unlinked, not its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


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
    where = f"the checkpoint to write to {str(directory)!r}"
    _check_fields(manifest, where, max_examples=max_examples, max_chunk_bytes=max_chunk_bytes)
    manifest["hmac-sha256"] = _mac(_ensure_key(key_path), manifest)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    _remove(tmp)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)
    for i, chunk in enumerate(chunks):
        _write_file(tmp / f"chunk-{i:05d}.bin", chunk)
    _write_file(tmp / "state.json", json.dumps(manifest, indent=1).encode("ascii"))
    _fsync_dir(tmp)
    _remove(old)
    if os.path.lexists(directory):
        directory.rename(old)
    tmp.rename(directory)
    _fsync_dir(directory.parent)
    if keep_previous and os.path.isdir(old) and not os.path.islink(old):
        previous = directory.with_name(directory.name + ".previous")
        _remove(previous)
        old.rename(previous)
        _fsync_dir(directory.parent)
    _remove(old)


def _parse_state(raw: bytes, where: str) -> dict[str, object]:
    def literal(text: str) -> object:
        return _Literal(text)

    def small_int(text: str) -> object:
        return int(text) if len(text) <= 32 else _Literal(text)

    try:
        manifest = json.loads(
            raw.decode("utf-8"), parse_constant=literal, parse_float=literal, parse_int=small_int
        )
    except RecursionError:
        raise CheckpointError(f"{where} nests too deeply to be a checkpoint.") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{where} is not UTF-8 text: {err}") from None
    except ValueError as err:
        raise CheckpointError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where} must hold a JSON object; got {type(manifest).__name__}.")
    return manifest


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
    fd = _open_regular(name, dir_fd=dir_fd, what=what)
    try:
        return _read_at_most(fd, limit), os.fstat(fd).st_size
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
    manifest = _parse_state(raw, where)
    fields = _check_fields(
        manifest, where, max_examples=max_examples, max_chunk_bytes=max_chunk_bytes
    )
    expected = _mac(_read_key(key_path), manifest)
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
    return Checkpoint(round=fields.round, payload=payload, num_examples=fields.num_examples)
