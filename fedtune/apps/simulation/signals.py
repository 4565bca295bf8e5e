"""Ctrl-C for a simulation: stop within seconds, leave nothing running, say how to resume.

Flower's simulation engine runs the ServerApp in a thread of its own and the
ClientApps in Ray actors; a ``KeyboardInterrupt`` in the main thread stops neither
(the server thread waits out its round timeout, Ray's workers keep training), so a
Ctrl-C left the process alive for minutes. :class:`RunStop` replaces that with:

1. the first SIGINT (or SIGTERM) waits for any run file the server is writing at that
   moment (the checkpoint, ``metrics.jsonl``, the pending round: :meth:`RunStop.guard`
   holds the lock around each), then keeps the lock so nothing more is written, stops
   every process this one started (Ray's raylet, GCS and workers: SIGTERM, then SIGKILL
   after a grace period), prints one line saying how to resume, and exits with 130;
2. a second SIGINT kills what is left at once and exits.

The run directory is then what a crash between two writes leaves, which a resume
accepts: the signed checkpoint of the last round trained, ``metrics.jsonl`` up to the
round before it, the checkpoint round's train half in the pending file. A client
interrupted inside a round either never wrote its ledger record or wrote it whole
(:mod:`fedtune.privacy.ledger`), and the resumed round sends it the same input, so the
record is replayed, not counted again.

The driver makes itself a child subreaper (Linux) while the run lasts, so a Ray worker
whose raylet died first is still its descendant and is found and stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fedtune import procs

__all__ = ["RunStop", "stop_descendants"]

#: Seconds the stop waits for a run file being written before it goes on anyway.
WRITE_WAIT = 10.0
#: Seconds between SIGTERM and SIGKILL for the processes this one started.
GRACE = 3.0


def stop_descendants(grace: float = GRACE) -> None:
    """SIGTERM every descendant, SIGKILL those alive after ``grace`` seconds, reap them."""
    killed = {p.pid for p in procs.stop_processes(procs.descendants(), grace)}
    # Processes started while we waited (a Ray worker being spawned) are stopped too.
    late = [p for p in procs.descendants() if p.pid not in killed]
    procs.stop_processes(late, min(grace, 0.5))
    with contextlib.suppress(ChildProcessError, OSError):  # reap adopted orphans
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


class RunStop:
    """Signal handling for one simulated run (see the module docstring).

    Parameters
    ----------
    hint : str
        The line printed when the run stopped, e.g. how to resume it.
    say : Callable[[str], None]
        Prints one line for the user (stderr).
    mute : Callable[[], None] | None
        Silences the run's own output once a stop is under way (the server would
        otherwise report every client that the stop took away).
    """

    def __init__(
        self, hint: str, say: Callable[[str], None], mute: Callable[[], None] | None = None
    ) -> None:
        self.hint = hint
        self.say = say
        self.mute = mute
        self.requested = threading.Event()
        self._lock = threading.RLock()
        self._old: dict[signal.Signals, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[RunStop]:
        """Handle SIGINT and SIGTERM (main thread only) for the ``with`` block."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        procs.prctl(procs.PR_SET_CHILD_SUBREAPER, 1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Hold the run-file lock: a stop waits until the ``with`` block is done."""
        with self._lock:
            yield

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` called under :meth:`guard` (for the server's run-file writers)."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            with self.guard():
                return fn(*args, **kwargs)

        guarded.__wrapped__ = fn  # type: ignore[attr-defined]
        return guarded

    def _handle(self, signum: int, frame: object) -> None:
        """In the main thread: record the request; the work is done in a thread."""
        del signum, frame
        if self.requested.is_set():
            os.write(2, b"fedtune simulate: forced stop.\n")
            stop_descendants(grace=0.0)
            self._exit(130)
        self.requested.set()
        threading.Thread(target=self._stop, name="fedtune-stop", daemon=True).start()

    def _stop(self) -> None:
        start = time.monotonic()
        logging.disable(logging.CRITICAL)
        if self.mute is not None:
            self.mute()
        self.say(
            "fedtune simulate: stopping (finishing the file being written, stopping Ray); "
            "press Ctrl-C again to force."
        )
        got = self._lock.acquire(timeout=WRITE_WAIT)  # kept: nothing is written after this
        del got
        stop_descendants(grace=max(0.5, GRACE - (time.monotonic() - start)))
        self.say(self.hint)
        self._exit(130)

    @staticmethod
    def _exit(code: int) -> None:
        """Leave now: Flower's server thread (not a daemon) would hold the interpreter."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
