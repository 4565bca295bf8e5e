"""A node's share of the machine's cores: how many torch threads its worker uses.

Several nodes on one machine (the deployment walkthrough starts three on one host) each
running torch with every core makes every node several times slower (measured: three
nodes with two threads each on two cores cost 3.45x a simulated round; one thread each,
1.44x). ``fedtune deploy supernode --threads`` sets the worker's share:

``auto`` (the default)
    each worker registers its pid in a per-user directory under the system's temporary
    directory; before each message it counts the live workers there and takes
    ``max(1, cores // live)`` threads, so nodes started or stopped later share too.
``N``
    exactly ``N`` threads (also exported as ``OMP_NUM_THREADS``).

Without ``FEDTUNE_THREADS`` (a simulation, a worker started by hand) the worker keeps
``OMP_NUM_THREADS`` if set, else torch's default.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from fedtune.errors import ConfigError

__all__ = ["ENV", "live_workers", "node_threads", "register", "registry_dir", "threads_for"]

#: The environment variable ``fedtune deploy supernode`` sets on its worker.
ENV = "FEDTUNE_THREADS"


def registry_dir() -> Path:
    """This user's directory of live node workers (mode 0700, created on first use)."""
    path = Path(tempfile.gettempdir()) / f"fedtune-nodes-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(
            f"{str(path)!r} is not a directory of this user's; remove it, or start the "
            "node with `--threads N`."
        )
    return path


def register(pid: int | None = None) -> Path:
    """Record a live worker (``pid``, default this process); returns its entry."""
    entry = registry_dir() / str(os.getpid() if pid is None else pid)
    entry.touch()
    return entry


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with this pid: not ours, but alive
        return True
    return True


def live_workers() -> int:
    """The number of registered workers still running (stale entries are removed)."""
    live = 0
    for entry in registry_dir().iterdir():
        if not entry.name.isdigit():
            continue
        if _alive(int(entry.name)):
            live += 1
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return live


def threads_for(setting: str, *, cores: int | None = None) -> int:
    """Threads for a ``--threads`` value: ``"auto"`` (this worker's share) or a count."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if setting == "auto":
        return max(1, cores // max(1, live_workers()))
    try:
        count = int(setting)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"--threads must be `auto` or a count >= 1, got {setting!r}.")
    return count


_registered: set[int] = set()


def node_threads() -> int:
    """The threads this worker should use now (0: leave torch's setting alone).

    With ``auto`` the calling process registers itself on first use (after a worker
    dropped to ``--user``, under that user: workers share with their own user's).
    """
    setting = os.environ.get(ENV, "")
    if setting == "auto" and os.getpid() not in _registered:
        register()
        _registered.add(os.getpid())
    if setting:
        return threads_for(setting)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else 0
