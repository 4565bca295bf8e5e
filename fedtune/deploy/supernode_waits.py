"""Flower's SuperNode with shorter idle waits: the launcher ``fedtune deploy supernode`` runs.

Flower 1.41's SuperNode (``flwr.supernode.start_client_internal``) sleeps 3 s each time
it asks the SuperLink for a message and finds none, and 0.5 s each time it looks in its
own state for a reply that is not there yet; neither is a setting. A deployed round
therefore waits, per message and node, up to 3 s before the node even sees its message
(``docs/deployment.md``, "How long a round takes"). Its SuperExec polls for tasks every
1 s, which Flower does let us set (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``): every
:data:`SUPEREXEC_POLL_SECONDS` on a node. (The SuperLink's own SuperExec keeps Flower's
1 s: it starts one ServerApp per run, and each of its polls costs the SuperLink an
authenticated HTTP request.)

:func:`write_launcher` writes a copy of the ``flower-supernode`` entry script that the
deployment would run, with one line added before Flower's entry point is called:
:func:`shorten_waits`, which gives that one module a ``time`` whose ``sleep`` waits
:data:`IDLE_POLL_SECONDS` instead of 3 s (still a pull every half second, per node, to
the SuperLink) and at most :data:`LOCAL_WAIT_SECONDS` for local waits. Everything else
(arguments, TLS, authentication, the process tree, its name in ``ps``) is Flower's. If
the installed Flower does not look like the one this was written for (the module has
no ``time`` of its own, or the entry script's form is unknown), nothing is patched and
the stock program runs: slower, never different.

Flower also starts a fresh ``flwr-clientapp`` process for every message, and its entry
script imports ``flwr.supernode.cli``, whose package ``__init__`` imports the whole
SuperNode (FastAPI, SQLAlchemy, Alembic) that a ClientApp never runs: about 1.05 s of
imports on an idle core of this 2-core machine, 0.67 s without (3 s and more while the
nodes train). :func:`write_clientapp_launcher` writes a copy of that entry script which
imports Flower's same ``flwr_clientapp`` function through :func:`clientapp_entry`, which
skips that package ``__init__``; ``fedtune deploy supernode`` puts its directory first on
the SuperNode's ``PATH``, where Flower's SuperExec looks the program up.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "IDLE_POLL_SECONDS",
    "LOCAL_WAIT_SECONDS",
    "SUPEREXEC_POLL_ENV",
    "SUPEREXEC_POLL_SECONDS",
    "clientapp_entry",
    "shorten_waits",
    "write_clientapp_launcher",
    "write_launcher",
]

#: Seconds between two pulls that found no message (Flower: 3).
IDLE_POLL_SECONDS = 0.5
#: Longest local wait, e.g. for a reply in the SuperNode's own state (Flower: 0.5).
LOCAL_WAIT_SECONDS = 0.1
#: Flower's own setting for its SuperExec's task poll (default 1 s), and our value.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
#: 0.25 s: a message waits 0.125 s on average for its ClientApp to be started; each
#: poll is an HTTP request to the SuperNode, so 0.1 s cost the three nodes of the
#: walkthrough about 7% of one core between them, all run long (``bench_deploy.py``).
SUPEREXEC_POLL_SECONDS = "0.25"

#: The line of pip's console script for ``flower-supernode`` that imports the entry.
_ENTRY_IMPORT = re.compile(r"^from flwr\.supernode\.cli import flower_supernode\s*$", re.M)
#: ... and for ``flwr-clientapp``.
_CLIENTAPP_IMPORT = re.compile(r"^from flwr\.supernode\.cli import flwr_clientapp\s*$", re.M)


class _ShortWaits:
    """The ``time`` module, with :meth:`sleep` shortened as described above."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(IDLE_POLL_SECONDS if seconds >= 3 else min(seconds, LOCAL_WAIT_SECONDS))


def shorten_waits(module: ModuleType | None = None) -> bool:
    """Give Flower's SuperNode loop short waits; False (nothing changed) if it does not fit."""
    if module is None:
        from flwr.supernode import start_client_internal  # noqa: PLC0415 - Flower

        module = start_client_internal
    if getattr(module, "time", None) is not time:
        return False
    setattr(module, "time", _ShortWaits())  # noqa: B010 - a module's global, on purpose
    return True


def clientapp_entry() -> Callable[[], None]:
    """Flower's ``flwr-clientapp`` entry point, imported without the SuperNode's modules.

    ``flwr.supernode.cli`` is entered in ``sys.modules`` as a bare package over its own
    directory (its submodules import as usual), so its ``__init__``, which imports the
    SuperNode, does not run. If it is already imported, nothing changes.
    """
    import flwr.supernode  # noqa: PLC0415 - Flower, only in the ClientApp's process

    name = "flwr.supernode.cli"
    if name not in sys.modules:
        path = [str(Path(next(iter(flwr.supernode.__path__))) / "cli")]
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = path
        package = ModuleType(name)
        package.__spec__, package.__path__, package.__package__ = spec, path, name
        sys.modules[name] = package
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # noqa: PLC0415

    return flwr_clientapp


def _write_patched(
    program: Path, directory: Path, *, name: str, entry: re.Pattern[str], lines: str, mode: int
) -> Path | None:
    """``program`` with its one ``entry`` import line replaced by ``lines``, as ``name``."""
    try:
        text = Path(program).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("#!") or len(entry.findall(text)) != 1:
        return None
    patched = entry.sub(lines, text)
    target = Path(directory) / name
    tmp = target.with_name(f".{name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), mode)
        out.write(patched)
    os.replace(tmp, target)
    return target


def write_launcher(program: Path, directory: Path, *, mode: int = 0o755) -> Path | None:
    """A copy of the ``flower-supernode`` script ``program`` that shortens the waits first.

    Written as ``directory/flower-supernode`` (never through a link) and returned; None
    if ``program`` is not the console script this knows (then run ``program`` itself).
    """
    lines = (
        "from flwr.supernode.cli import flower_supernode\n"
        "from fedtune.deploy.supernode_waits import shorten_waits\n"
        "shorten_waits()"
    )
    return _write_patched(
        program, directory, name="flower-supernode", entry=_ENTRY_IMPORT, lines=lines, mode=mode
    )


def write_clientapp_launcher(program: Path, directory: Path, *, mode: int = 0o755) -> Path | None:
    """A copy of the ``flwr-clientapp`` script ``program`` with the lean import.

    Written as ``directory/flwr-clientapp`` (never through a link) and returned; None if
    ``program`` is not the console script this knows (Flower's own then runs).
    """
    lines = (
        "from fedtune.deploy.supernode_waits import clientapp_entry\n"
        "flwr_clientapp = clientapp_entry()"
    )
    return _write_patched(
        program, directory, name="flwr-clientapp", entry=_CLIENTAPP_IMPORT, lines=lines, mode=mode
    )
