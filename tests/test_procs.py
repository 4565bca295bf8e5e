"""Signals passed on, processes found below, stopped with a grace period (fedtune/procs.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from fedtune import procs

#: A child that ignores SIGTERM (only SIGKILL ends it), after saying it is ready.
STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)
#: A child that starts a grandchild and prints its pid, then waits.
PARENT = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print(g.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _start(code: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()  # ready (or the grandchild's pid)
    return child


@pytest.fixture
def handlers() -> Iterator[None]:
    """Leave pytest's own signal handlers as they were."""
    old = {s: signal.getsignal(s) for s in procs.StopRelay.SIGNALS}
    yield
    for s, handler in old.items():
        signal.signal(s, handler)


def test_a_hangup_reaches_the_children_as_sigterm_and_asks_the_stop(handlers: None) -> None:
    children: dict[str, subprocess.Popen[bytes]] = {}
    relay = procs.StopRelay(children.values())
    # started after the relay: the live view still finds it
    children["late"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert not relay.stopping
        os.kill(os.getpid(), signal.SIGHUP)
        assert children["late"].wait(timeout=30) == -signal.SIGTERM
        assert relay.stopping
    finally:
        procs.end_children(children.values(), grace=1.0)


def test_sigint_is_passed_on_as_itself(handlers: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    relay = procs.StopRelay([child])
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert child.wait(timeout=30) != 0  # a KeyboardInterrupt in the child
        assert relay.stopping
    finally:
        procs.end_children([child], grace=1.0)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    child = _start(STUBBORN)
    start = time.monotonic()
    procs.end_children([child], grace=0.5)
    assert child.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 20


def test_the_processes_below_a_child_are_found_and_stopped() -> None:
    child = _start(PARENT)
    try:
        below = procs.descendants(child.pid)
        assert len(below) == 1 and below[0].pid != child.pid
        start = time.monotonic()
        assert procs.stop_processes(below, grace=30.0) == []  # it went on SIGTERM
        # ended: a zombie until its parent reaps it, not waited for until the grace is out
        assert time.monotonic() - start < 15
        assert below[0].status() == psutil.STATUS_ZOMBIE
    finally:
        procs.end_children([child], grace=1.0)
    assert procs.descendants(child.pid) == []  # gone, so nothing below it


def test_a_process_that_ignores_sigterm_is_killed_and_returned() -> None:
    child = _start(STUBBORN)
    (proc,) = [p for p in procs.descendants() if p.pid == child.pid]
    killed = procs.stop_processes([proc], grace=0.5)
    assert [p.pid for p in killed] == [child.pid]
    assert not psutil.pid_exists(child.pid)  # our child: reaped too


def test_a_vanished_process_is_no_error() -> None:
    child = _start("print('ready', flush=True)")
    proc = psutil.Process(child.pid)
    child.wait(timeout=10)
    assert procs.stop_processes([proc], grace=0.1) == []
    assert procs.descendants(child.pid) == []


def test_prctl_is_best_effort() -> None:
    procs.prctl(-1, 0)  # an option no kernel has: ignored, as elsewhere than Linux
