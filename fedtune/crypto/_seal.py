"""Thin adapter over TenSEAL's SEAL bindings (``tenseal.sealapi``).

Why the low-level bindings and not ``tenseal.ckks_vector``: TenSEAL's
high-level API (measured, see :mod:`fedtune.crypto`) cannot create a context
with a single prime (it always generates relinearisation keys), encodes only
real numbers (half of every ciphertext wasted) and serialises fresh symmetric
ciphertexts unseeded (the uniformly random half stored in full). Together that
is 4x the wire size of what SEAL itself offers for our add-only protocol.

``tenseal.sealapi`` only saves and loads through file paths, so bytes go
through a private scratch directory (``mkdtemp``: mode 0700, one per process,
removed at exit).
"""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fedtune.errors import PayloadError

__all__ = [
    "SealHeader",
    "expected_version",
    "parse_header",
    "scratch_dir",
    "seal_dump",
    "seal_load",
]

# SEALHeader: uint16 magic, uint8 header_size, uint8 version_major,
# uint8 version_minor, uint8 compr_mode, uint16 reserved, uint64 size
# (seal/serialization.h), little endian.
_HEADER = struct.Struct("<HBBBBHQ")
SEAL_MAGIC = 0xA15E
_COMPR_MODES = {0: "none", 1: "zlib", 2: "zstd"}


def sealapi() -> Any:
    """Import ``tenseal.sealapi`` on first use (nothing happens at import time)."""
    import tenseal.sealapi as sa

    return sa


@dataclass(frozen=True)
class SealHeader:
    """The 16-byte header SEAL writes in front of every serialised object."""

    version: tuple[int, int]
    compr_mode: str
    size: int


def expected_version() -> tuple[int, int]:
    """SEAL version of this build, as written in every SEALHeader."""
    h = sealapi().Serialization.SEALHeader()
    return (int(h.version_major), int(h.version_minor))


def parse_header(data: bytes, *, field: str) -> SealHeader:
    """Check a SEAL header without deserialising anything behind it.

    Parameters
    ----------
    data : bytes
        A serialised SEAL object.
    field : str
        Name of the field the bytes came from, for error messages.

    Raises
    ------
    PayloadError
        If the magic number, header size, version, compression mode or
        declared size does not match, or trailing bytes follow the object.
    """
    if len(data) < _HEADER.size:
        raise PayloadError(f"`{field}` is {len(data)} bytes, shorter than a SEAL header.")
    magic, hsize, major, minor, compr, reserved, size = _HEADER.unpack_from(data)
    if magic != SEAL_MAGIC or hsize != _HEADER.size or reserved != 0:
        raise PayloadError(
            f"`{field}` does not start with a SEAL header (magic=0x{magic:04X}, "
            f"header_size={hsize}, reserved={reserved}; expected 0x{SEAL_MAGIC:04X}, 16, 0)."
        )
    if (major, minor) != expected_version():
        raise PayloadError(
            f"`{field}` was written by SEAL {major}.{minor}; this build reads {{}}.{{}}.".format(
                *expected_version()
            )
        )
    if compr not in _COMPR_MODES:
        raise PayloadError(f"`{field}` has unknown compression mode {compr}.")
    if size != len(data):
        raise PayloadError(
            f"`{field}` declares {size} bytes in its SEAL header but has {len(data)}."
        )
    return SealHeader(version=(major, minor), compr_mode=_COMPR_MODES[compr], size=size)


_SCRATCH: dict[int, str] = {}  # pid -> this process's scratch directory
_SCRATCH_LOCK = threading.Lock()


def _remove_scratch(pid: int, path: str) -> None:
    if os.getpid() == pid:  # never a forked child removing its parent's directory
        shutil.rmtree(path, ignore_errors=True)


def _memory_tmp() -> str | None:
    """``/dev/shm`` where there is one: nothing touches the disk, and unlinking is
    cheap (3 ms per file on the development machine's disk-backed ``/tmp``)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


@contextmanager
def scratch_dir() -> Iterator[str]:
    """This process's private directory (mode 0700) for SEAL saves and loads.

    Made on first use (in memory where the system has ``/dev/shm``) and removed
    at exit, not per call: creating and removing a directory cost 3 ms per call
    on the development machine's ``/tmp``, more than the SEAL load itself. Files
    in it get unique names (``mkstemp``, 0600) and are removed as soon as SEAL
    is done with them.
    """
    pid = os.getpid()
    with _SCRATCH_LOCK:
        path = _SCRATCH.get(pid)
        if path is None or not os.path.isdir(path):
            path = tempfile.mkdtemp(prefix="fedtune-seal-", dir=_memory_tmp())
            _SCRATCH[pid] = path
            atexit.register(_remove_scratch, pid, path)
    yield path


def seal_dump(save: Callable[[str], None], directory: str) -> bytes:
    """Return the bytes that SEAL's ``save(path)`` writes."""
    fd, path = tempfile.mkstemp(dir=directory)
    os.close(fd)
    try:
        save(path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.remove(path)


def seal_load(load: Callable[[str], None], data: bytes, directory: str) -> None:
    """Feed ``data`` to SEAL's ``load(path)``; the file is created 0600 and removed."""
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        load(path)
    finally:
        os.remove(path)
