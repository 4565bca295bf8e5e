"""What the driver changes about the apps for one simulated run, and undoes after it.

The ServerApp writes its run files and prints its round lines itself;
:func:`server_hooks` routes the writes through the stop lock
(:class:`~fedtune.apps.simulation.signals.RunStop`) and the lines to the live display
(:class:`~fedtune.apps.simulation.progress.RunProgress`).
:class:`ClientFailuresToLog` moves Flower's traces of failed clients to ``clients.log``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from fedtune.apps.server import app as server_app
from fedtune.apps.server import loop as server_loop
from fedtune.apps.server import verified
from fedtune.apps.simulation.progress import RunProgress
from fedtune.apps.simulation.signals import RunStop

__all__ = ["ClientFailuresToLog", "server_hooks"]


@contextlib.contextmanager
def server_hooks(stop: RunStop, progress: RunProgress) -> Any:
    """Route the ServerApp's run-file writes through ``stop``'s lock, its console to ``progress``.

    The ServerApp's modules look these names up when it calls them, so the wrapped
    writers hold the lock for the whole write (a Ctrl-C never cuts a checkpoint or a
    metrics line in half) and its round lines and status land in the live display.
    """

    patches = [
        (server_loop, "save_checkpoint"),
        (server_loop, "save_pending"),
        (server_loop, "append_record"),
        (verified, "save_checkpoint"),
    ]
    originals = [(mod, name, getattr(mod, name)) for mod, name in patches]
    consoles = [(mod, mod.Console) for mod in (server_app, server_loop)]
    try:
        for mod, name, fn in originals:
            setattr(mod, name, stop.wrap(fn))
        for mod, _ in consoles:
            mod.Console = lambda *a, **k: progress.console  # type: ignore[attr-defined]
        yield
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
        for mod, console in consoles:
            mod.Console = console  # type: ignore[attr-defined]


class ClientFailuresToLog(logging.Filter):
    """Flower's traces of a failed ClientApp go to ``RUN_DIR/clients.log``, not the terminal.

    Flower's simulation worker logs each failure at ERROR with the whole Ray trace
    (hundreds of lines per client and round); the client's own one-line cause is
    printed by the progress display (:mod:`fedtune.apps.simulation.clients`).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # The server's note of each dropped reply repeats a failure already shown.
        dropped = record.name == "fedtune.server" and "client error:" in message
        if record.levelno < logging.ERROR and not dropped:
            return True
        with contextlib.suppress(OSError), self.path.open("a") as fh:
            fh.write(f"--- {record.name} {record.levelname}: {message}\n")
        return False
