"""A node's share of the machine's cores: its torch threads, and turns on a shared machine.

Several nodes on one machine (the deployment walkthrough starts three on one host) each
running torch with every core at once make every node several times slower (measured:
three nodes with two threads each on two cores cost 3.45x a simulated round). Giving
each a fixed share (one thread each) was still 1.26-1.5x: the three single-threaded
nodes did about a fifth more work between them than one client at a time with both
cores, and when the others were done the last one left a core idle.
``fedtune deploy supernode --threads`` therefore offers:

``auto`` (the default)
    this user's co-located node workers **take turns**: a worker holds a machine-wide
    turn (an ``flock`` on a file in a per-user directory, mode 0700, under the system's
    temporary directory) while it works on a message, and uses every core for it, which
    is how ``fedtune simulate`` runs its clients by default (one at a time, all cores).
    A node alone on its machine never waits; nodes started or stopped later join or
    leave by themselves, and a worker that dies releases its turn with its file
    descriptor.
``N``
    exactly ``N`` threads (also exported as ``OMP_NUM_THREADS``) and no turns: nodes
    work at the same time (for a machine with many cores, ``--threads cores//nodes``).

Without ``FEDTUNE_THREADS`` (a simulation, a worker started by hand) the worker keeps
``OMP_NUM_THREADS`` if set, else torch's default, and takes no turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fedtune.errors import ConfigError

__all__ = ["ENV", "node_threads", "threads_for", "turn", "turn_dir"]

#: The environment variable ``fedtune deploy supernode`` sets on its worker.
ENV = "FEDTUNE_THREADS"

#: The file whose ``flock`` is the machine's turn, in :func:`turn_dir`.
TURN_FILE = "turn.lock"


def turn_dir() -> Path:
    """This user's directory for the turn (mode 0700, created on first use)."""
    path = Path(tempfile.gettempdir()) / f"fedtune-nodes-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{str(path)!r} is not a private directory of this user's; remove it, or start "
            "the node with `--threads N`."
        )
    return path


def threads_for(setting: str, *, cores: int | None = None) -> int:
    """Threads for a ``--threads`` value: ``"auto"`` (every core, in turns) or a count."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if setting == "auto":
        return max(1, cores)
    try:
        count = int(setting)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"--threads must be `auto` or a count >= 1, got {setting!r}.")
    return count


def node_threads() -> int:
    """The threads this worker should use now (0: leave torch's setting alone)."""
    setting = os.environ.get(ENV, "")
    if setting:
        return threads_for(setting)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else 0


@contextlib.contextmanager
def turn(on_wait: Callable[[], None] | None = None) -> Iterator[float]:
    """Hold this machine's turn while a message is worked on; yields the seconds waited.

    Only under ``--threads auto`` (``FEDTUNE_THREADS=auto``); otherwise it waits for
    nothing and yields 0. ``on_wait`` is called once if another worker holds the turn
    now (before waiting for it). The turn file is opened without following links and
    never read or written: only its lock counts.
    """
    if os.environ.get(ENV, "") != "auto":
        yield 0.0
        return
    path = turn_dir() / TURN_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        start = time.perf_counter()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.perf_counter() - start
    finally:
        os.close(fd)  # closing the descriptor releases the lock
