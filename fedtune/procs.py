"""The processes fedtune starts: pass signals on, find what is below, stop it all.

One place for what the simulation's Ctrl-C (:mod:`fedtune.apps.simulation.signals`) and
``fedtune deploy``'s supervisors (:mod:`fedtune.deploy.cli`, :mod:`fedtune.deploy.node`)
both need: a child is stopped with SIGTERM, then SIGKILL after a grace period; the
processes found below it are ``psutil.Process`` objects, so a pid reused meanwhile is
never signalled; the Linux ``prctl`` options are best effort (nothing elsewhere).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterable
from typing import Any

import psutil

__all__ = [
    "PR_SET_CHILD_SUBREAPER",
    "PR_SET_PDEATHSIG",
    "StopRelay",
    "descendants",
    "end_children",
    "prctl",
    "stop_processes",
]

#: prctl(2): the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: prctl(2): orphaned descendants are re-parented to this process, not to init.
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> None:
    """Linux ``prctl(option, value)``; errors ignored, nothing on other systems."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """Every live process below ``pid`` (this process by default); zombies left out."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    live = []
    for p in below:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
    return live


def _running(p: psutil.Process) -> bool:
    """Whether ``p`` still runs: a zombie has ended (its parent has yet to reap it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after up to ``timeout`` seconds; ours reaped."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p not in alive:
            with contextlib.suppress(ChildProcessError, OSError):  # not our child: its parent's
                os.waitpid(p.pid, os.WNOHANG)
    return alive


def stop_processes(procs: Iterable[psutil.Process], grace: float) -> list[psutil.Process]:
    """SIGTERM ``procs``; SIGKILL those alive after ``grace`` seconds; return those killed."""
    procs = list(procs)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    alive = _wait(procs, grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _wait(alive, grace)
    return alive


def end_children(children: Iterable[subprocess.Popen[Any]], grace: float = 20.0) -> None:
    """SIGTERM the live ``children``, wait ``grace`` seconds for each, SIGKILL the rest."""
    children = list(children)
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class StopRelay:
    """Pass SIGTERM, SIGINT and SIGHUP on to ``children``, and note that a stop was asked.

    A supervisor installs one (in the main thread) and runs until ``stopping`` is set or
    a child ends. ``children`` is read at each signal, so a live view (a dict's
    ``values()``) sees children started later. SIGHUP, a closed terminal, is passed on
    as SIGTERM: the children stop as they would under ``kill``, not die alone.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, children: Collection[subprocess.Popen[Any]]) -> None:
        self.children = children
        self.stopping = False
        for signum in self.SIGNALS:
            signal.signal(signum, self._forward)

    def _forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for child in list(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
