"""What a simulation is doing, shown as it happens: a live line on a terminal, quiet elsewhere.

:class:`RunProgress` owns the one console of a ``fedtune simulate`` run (stderr). On a
terminal it keeps a live status line from the first second: the phase (checking the
configuration, starting Ray, loading the model in the clients, the round being
trained), the seconds elapsed, and inside a round which clients have finished. It
prints a summary line as soon as a round is trained (the server's own line for that
round follows with its evaluation, which arrives with the next round). Not on a
terminal (a pipe, a log file, CI) the live line and the trained summaries are
left out: only the server's round lines and one line per client failure remain.

The client events come from :mod:`fedtune.apps.simulation.clients` (a file in the run
directory that the Ray actors append to); the trained rounds from the server's pending
file (``pending-round.json``), written just before each checkpoint.

This module imports only ``rich`` so that the CLI can show it before torch loads.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

__all__ = ["CLIENTS_LOG", "EVENTS", "ProgressConsole", "RunProgress"]

#: Full traces of the clients' failures, in the run directory (appended).
CLIENTS_LOG = "clients.log"
#: The clients' events, in the run directory: one JSON object per line,
#: ``{"t", "client", "kind", "round", "event"[, "cause"]}``.
EVENTS = "client-events.jsonl"

#: Seconds between two looks at the run directory.
POLL = 0.25


class ProgressConsole(Console):
    """A console whose ``status(text)`` sets the run's phase instead of a second live line.

    The ServerApp prints its round lines on a console of its own and wraps each
    exchange in ``console.status``; given this console, its lines print above the
    live line and its status becomes the live line's phase.
    """

    progress: RunProgress | None = None
    muted = False

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not self.muted:
            super().print(*objects, **kwargs)

    @contextmanager  # a context manager, as rich's Status is
    def status(self, status: RenderableType, *args: Any, **kwargs: Any) -> Iterator[None]:  # type: ignore[override]
        del args, kwargs
        if self.progress is None:
            yield
            return
        self.progress.phase(str(status))
        yield


class RunProgress:
    """The live display of one run (see the module docstring).

    Parameters
    ----------
    live : bool | None
        Show the live line and trained summaries; default: when stderr is a terminal.
    """

    def __init__(self, *, live: bool | None = None) -> None:
        self.console = ProgressConsole(stderr=True, highlight=False, soft_wrap=True)
        self.console.progress = self
        self.live = self.console.is_terminal if live is None else live
        self._phase = "starting"
        self._start = time.monotonic()
        self._clients: dict[str, str] = {}  # client -> what it is doing now
        self._round: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._display: Live | None = None
        self._spinner = Spinner("dots")
        self._lock = threading.Lock()
        self.failures: list[str] = []

    # -- the live line ---------------------------------------------------------------

    def __enter__(self) -> RunProgress:
        if self.live:
            self.console.file.write("\r\x1b[2K")  # the CLI's early status line, if any
            self._display = Live(
                get_renderable=self._render,
                console=self.console,
                refresh_per_second=4,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._display.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop watching and remove the live line (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        if self._display is not None:
            self._display.stop()
            self._display = None

    def phase(self, text: str) -> None:
        """What the run does now (one short line)."""
        with self._lock:
            self._phase = text.rstrip("…. ")

    def print(self, line: str) -> None:
        """One line above the live line (shown unless :meth:`mute`)."""
        self.console.print(line, markup=False)

    def say(self, line: str) -> None:
        """One line on stderr, muted or not (the stop's own messages)."""
        if self._display is not None:
            self._display.stop()
            self._display = None
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def mute(self) -> None:
        """Print nothing more of the run (a stop is under way)."""
        self.console.muted = True
        self._stop.set()

    def _render(self) -> RenderableType:
        with self._lock:
            text = f"{self._phase}  [{time.monotonic() - self._start:.0f} s]"
            busy = sorted(self._clients.items())
        if busy:
            done = sum(1 for _, state in busy if state == "done")
            text += f"  clients done {done}/{len(busy)}: " + ", ".join(
                f"{name} {state}" for name, state in busy[:8]
            )
            text += " …" if len(busy) > 8 else ""
        self._spinner.update(text=Text(text, overflow="ellipsis", no_wrap=True))
        return self._spinner

    # -- watching the run directory --------------------------------------------------

    def watch(self, run_dir: Path, num_rounds: int, *, first_round: int = 1) -> None:
        """Follow ``run_dir``'s client events and trained rounds in a daemon thread."""
        self._thread = threading.Thread(
            target=self._follow,
            args=(Path(run_dir), num_rounds, first_round - 1),
            name="fedtune-progress",
            daemon=True,
        )
        self._thread.start()

    def _follow(self, run_dir: Path, num_rounds: int, trained: int) -> None:
        try:  # a resumed run's earlier events are not news
            offset = (run_dir / EVENTS).stat().st_size
        except OSError:
            offset = 0
        log_path = run_dir / CLIENTS_LOG
        while not self._stop.wait(POLL):
            offset = self._read_events(run_dir / EVENTS, offset, log_path)
            trained = self._read_trained(run_dir, num_rounds, trained)

    def _read_events(self, path: Path, offset: int, log_path: Path) -> int:
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return offset
        end = data.rfind(b"\n") + 1  # a line being written waits for the next look
        for raw in data[:end].splitlines():
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            self._event(event, log_path)
        return offset + end

    def _event(self, event: dict[str, Any], log_path: Path) -> None:
        client, kind, rnd = event.get("client"), event.get("kind"), event.get("round")
        name = event.get("event")
        with self._lock:
            if kind == "train" and rnd != self._round:  # a new round: forget the last one's
                self._round = rnd
                self._clients = {}
            if name == "start":
                self._clients[str(client)] = "training" if kind == "train" else "evaluating"
            elif name == "done" and kind == "train":
                self._clients[str(client)] = "done"
            elif name == "error":
                self._clients[str(client)] = "failed"
        if name == "error":
            line = (
                f"{client} failed in {kind} round {rnd}: {event.get('cause', 'unknown cause')} "
                f"(full trace: {log_path})"
            )
            self.failures.append(line)
            self.print(line)

    def _read_trained(self, run_dir: Path, num_rounds: int, trained: int) -> int:
        try:
            records = json.loads((run_dir / "pending-round.json").read_text())
        except (OSError, ValueError):
            return trained
        newest = max(
            (r for r in records if isinstance(r, dict) and isinstance(r.get("round"), int)),
            key=lambda r: r["round"],
            default=None,
        )
        if newest is None or newest["round"] <= trained:
            return trained
        if self.live:
            self.print(_trained_line(newest, num_rounds))
        return int(newest["round"])


def _trained_line(record: dict[str, Any], num_rounds: int) -> str:
    """``round 2/5 trained  clients 3/3  train-loss 0.912  epsilon 1.20  4.1s``."""
    line = f"round {record['round']}/{num_rounds} trained  "
    line += f"clients {record.get('clients-trained', '?')}/{record.get('clients-sampled', '?')}"
    for key, fmt in (("train-loss", ".3f"), ("epsilon", ".3f")):
        if isinstance(record.get(key), (int, float)):
            line += f"  {key} {record[key]:{fmt}}"
    if isinstance(record.get("train-seconds"), (int, float)):
        line += f"  {record['train-seconds']:.1f}s  (evaluated with the next round)"
    return line
