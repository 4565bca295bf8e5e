"""Private files a process writes for itself and reads back as untrusted bytes.

Writing: a new file is created with ``O_EXCL | O_NOFOLLOW`` and mode 0600 (set
with ``fchmod``, whatever the umask), written in full and ``fsync``-ed;
:func:`write_private` replaces a file atomically (a sibling temporary file, then
``os.replace``), so a crash leaves the old file or the new one, never half of one.

Reading (STYLE rule 13): a file is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a
symlink is refused, a FIFO cannot hang the reader), must be a regular file, and
is read up to a cap plus one byte, so an oversized file is detected without being
read whole.

Used by the checkpoint (:mod:`fedtune.run.checkpoint`) and the client's release
records (:mod:`fedtune.privacy.releases`).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

__all__ = [
    "fsync_dir",
    "open_regular",
    "read_at_most",
    "read_private",
    "remove",
    "write_new",
    "write_private",
]

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO can't hang
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_regular(
    path: str | Path,
    *,
    dir_fd: int | None = None,
    what: str,
    error: type[Exception] = ValueError,
) -> int:
    """Open ``path`` for reading; refuse symlinks and anything but a regular file.

    Parameters
    ----------
    path : str | Path
        The file, relative to ``dir_fd`` when one is given.
    dir_fd : int | None
        An open directory to resolve ``path`` in (no symlink race on the directory).
    what : str
        The file as the error message names it.
    error : type[Exception]
        Raised (with ``what`` in its message) for a symlink, a non-regular file or
        another ``OSError``; :class:`FileNotFoundError` passes through unchanged.
    """
    try:
        fd = os.open(path, _READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise error(f"{what} is a symlink or not a regular file.") from err
        raise error(f"{what} cannot be opened: {err}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{what} is a symlink or not a regular file.")
    return fd


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd`` (callers pass cap + 1 to detect an overrun)."""
    parts, left = [], limit
    while left > 0:
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def read_private(path: Path, limit: int, *, error: type[Exception] = ValueError) -> bytes | None:
    """The bytes of the regular file ``path`` (at most ``limit``); ``None`` if it is absent.

    Raises
    ------
    error
        ``path`` is a symlink, not a regular file, or larger than ``limit`` bytes.
    """
    try:
        fd = open_regular(path, what=repr(str(path)), error=error)
    except FileNotFoundError:
        return None
    try:
        data = read_at_most(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{str(path)!r} is larger than {limit} bytes.")
    return data


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist; never through a symlink), mode 0600, and fsync it."""
    fd = os.open(path, _CREATE, 0o600)
    try:
        os.fchmod(fd, 0o600)  # explicit, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, mode 0600 (parents made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{secrets.token_hex(4)}.tmp")
    try:
        write_new(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove ``path`` without following a symlink (a link is unlinked, not its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
