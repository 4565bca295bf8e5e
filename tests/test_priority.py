"""Flower's control plane started nicer than the nodes' training (fedtune/deploy/priority.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.deploy import priority
from fedtune.deploy.roles import Launch
from fedtune.errors import ConfigError

#: Prints the child's niceness, its session id and its autogroup line, or "-" where the kernel
#: shows none: no file, or an empty one (a process still in the boot-time autogroup, no setsid
#: above it since boot, reads an empty file, as CI's test run does).
PROBE = (
    "import os, pathlib\n"
    "p = pathlib.Path('/proc/self/autogroup')\n"
    "print(os.nice(0), os.getsid(0), (p.read_text().strip() if p.exists() else '') or '-')\n"
)


def _probe(launch: Launch) -> tuple[int, int, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=launch.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        **launch.popen_kwargs(),
    )
    nice, sid, autogroup = done.stdout.split(maxsplit=2)
    return int(nice), int(sid), autogroup.strip()


def test_a_nice_launch_runs_nicer_in_a_session_of_its_own() -> None:
    base = os.nice(0)
    nice, sid, autogroup = _probe(Launch([], dict(os.environ), nice=5))
    assert nice == min(19, base + 5)
    assert sid != os.getsid(0)
    # The kernel shares CPU by autogroup first; unprivileged writes are rate-limited (one per
    # 0.1 s machine-wide, so best effort there), root's are not.
    if autogroup != "-" and os.geteuid() == 0:
        assert autogroup.endswith(" nice 5"), autogroup


def test_nice_zero_starts_it_as_before() -> None:
    nice, sid, _ = _probe(Launch([], dict(os.environ)))
    assert nice == os.nice(0) and sid == os.getsid(0)
    assert Launch([], {}).popen_kwargs() == {}


@pytest.mark.parametrize("bad", [-1, 20, 100])
def test_a_niceness_outside_0_to_19_is_one_line(bad: int) -> None:
    with pytest.raises(ConfigError, match=rf"--nice must be from 0 to 19, got {bad}\."):
        priority.check_nice(bad)
    assert priority.check_nice(0) == 0 and priority.check_nice(19) == 19


def test_the_commands_take_the_option_with_their_defaults(tmp_path: Path) -> None:
    for role, default in (("superlink", "19"), ("supernode", "10")):
        done = subprocess.run(
            [sys.executable, "-m", "fedtune.cli", "deploy", role, "--help"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        assert "--nice N" in done.stdout and f"(default {default};" in " ".join(done.stdout.split())
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "deploy", "superlink", "--certs", str(tmp_path)]
        + ["--state-dir", str(tmp_path / "s"), "--nice", "25"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode != 0 and "--nice must be from 0 to 19, got 25." in done.stderr
    assert "Traceback" not in done.stderr


#: A supervisor stand-in: starts a nice child that sleeps, prints the child's pid, waits.
SUPERVISOR = (
    "import os, subprocess, sys, time\n"
    "from fedtune.deploy.roles import Launch\n"
    "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
    "launch = Launch(sleeper, dict(os.environ), nice=3)\n"
    "child = subprocess.Popen(launch.argv, env=launch.env, **launch.popen_kwargs())\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie waits only to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_nice_child_stops_when_its_supervisor_is_killed() -> None:
    """In a session of its own it misses the terminal's signals; its parent's death is one."""
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True
    )
    assert supervisor.stdout is not None
    child = int(supervisor.stdout.readline())
    supervisor.kill()
    supervisor.wait(timeout=30)
    deadline = time.monotonic() + 20
    while (alive := _running(child)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the child outlived its supervisor"


#: `fedtune deploy superlink`'s supervisor over two sleepers; prints their pids, then runs.
PAIR = (
    "import os, sys\n"
    "from fedtune.deploy.cli import _supervise_pair\n"
    "from fedtune.deploy.roles import Launch\n"
    "code = 'import os, time; print(os.getpid(), flush=True); time.sleep(120)'\n"
    "a, b = (Launch([sys.executable, '-c', code], dict(os.environ), nice=n) for n in (0, 3))\n"
    "sys.exit(_supervise_pair(a, b))\n"
)


def test_a_closed_terminal_stops_the_supervisor_and_its_children() -> None:
    """SIGHUP is taken as SIGTERM: the children are stopped and the supervisor exits 0."""
    supervisor = subprocess.Popen(
        [sys.executable, "-c", PAIR], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert supervisor.stdout is not None
    children = [int(supervisor.stdout.readline()) for _ in range(2)]
    supervisor.send_signal(signal.SIGHUP)
    assert supervisor.wait(timeout=60) == 0  # handled, not killed by the signal
    deadline = time.monotonic() + 20
    while any(_running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [c for c in children if _running(c)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "a child outlived its supervisor's SIGHUP"
