"""Key and certificate files: fixed modes whatever the umask, never through a link.

``fedtune keygen`` (:func:`fedtune.crypto.save_keys`) and ``fedtune deploy certs`` /
``node-key`` (:mod:`fedtune.deploy.pki`) write secrets. Under ``umask 000`` a plain
``mkdir`` / ``open`` makes 0777 folders and 0666 files, and a ``write_bytes`` to a
name someone planted as a symbolic link writes wherever the link points. Here:

* every directory this module makes, parents included, is mode 0700 (set with
  ``fchmod`` on a descriptor opened with ``O_NOFOLLOW``, not filtered by the umask);
  an existing directory that other users may write in is refused (they could swap
  the files in it), as is a directory given as a symbolic link;
* every file is written to a fresh temporary name in its directory
  (``O_CREAT | O_EXCL | O_NOFOLLOW``), given its mode with ``fchmod``, ``fsync``-ed,
  and then ``link``-ed to its name: ``link`` never follows or replaces what is
  there, so a planted file or link makes the write fail (:class:`KeyFileError`,
  naming the path and what to do), and a crash leaves the whole file or none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from fedtune.errors import KeyFileError, KeyFileExists

__all__ = [
    "PRIVATE_MODE",
    "PUBLIC_MODE",
    "SECRET_DIR_MODE",
    "private_dir",
    "write_key_file",
]

#: A private key or secret context: the owner only.
PRIVATE_MODE = 0o600
#: A public file (certificate, public context, fingerprint): readable by all.
PUBLIC_MODE = 0o644
#: A directory that holds a private key.
SECRET_DIR_MODE = 0o700

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _set_dir_mode(path: Path, mode: int) -> None:
    fd = os.open(path, _DIR)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def private_dir(path: Path, option: str) -> Path:
    """Make ``path`` (and each missing parent) mode 0700, or check an existing one.

    Parameters
    ----------
    path : Path
        The directory that will hold key files.
    option : str
        The command-line option that named it (for the error message).

    Raises
    ------
    KeyFileError
        If ``path`` is a symbolic link or not a directory, or other users may write
        in it (mode ``& 0o022``).
    """
    path = Path(path)
    if path.is_symlink():
        raise KeyFileError(f"{option} {str(path)!r} is a symbolic link; give the directory itself.")
    missing: list[Path] = []
    where = path
    while not where.exists() and not where.is_symlink() and where != where.parent:
        missing.append(where)
        where = where.parent
    made: set[Path] = set()
    for new in reversed(missing):
        try:
            os.mkdir(new, SECRET_DIR_MODE)
        except FileExistsError:  # made meanwhile: checked below like any existing one
            continue
        _set_dir_mode(new, SECRET_DIR_MODE)  # mkdir's mode is filtered by the umask
        made.add(new)
    if path in made:
        return path
    try:
        fd = os.open(path, _DIR)
    except OSError as err:
        reason = "not a directory" if err.errno in (errno.ENOTDIR, errno.ELOOP) else err.strerror
        raise KeyFileError(f"{option} {str(path)!r}: {reason}.") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if mode & 0o022:
        raise KeyFileError(
            f"{option} {str(path)!r} is writable by other users (mode {mode:04o}), who could "
            f"replace the keys in it; give a new directory or run `chmod 700 {path}` first."
        )
    return path


def write_key_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to the new file ``path`` with exactly ``mode``, atomically.

    Raises
    ------
    KeyFileExists
        If anything (a file, a symbolic link) is already at ``path``.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        what = "a symbolic link" if path.is_symlink() else "a file"
        raise KeyFileExists(
            f"{str(path)!r} already exists ({what}); fedtune never overwrites key files or "
            "writes through links. Remove it, or choose a new directory."
        )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, _CREATE, mode)
    try:
        try:
            os.fchmod(fd, mode)  # explicit, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path, follow_symlinks=False)  # never replaces what is there
        except FileExistsError:
            raise KeyFileExists(
                f"{str(path)!r} appeared while it was written; fedtune never overwrites "
                "key files or writes through links. Remove it, or choose a new directory."
            ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
