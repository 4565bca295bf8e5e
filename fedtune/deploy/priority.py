"""Flower's control plane at a lower CPU priority than the nodes' training.

On the deployment walkthrough's 2-core machine the SuperLink, the SuperNodes and their
SuperExecs poll each other several times a second: about 15% of one core idle, more during
a run. A worker training with both cores then waits at each of torch's OpenMP barriers for
whichever thread was preempted, so that background work cost the training about twice its
CPU share (measured: a 17%-of-one-core background made a 2-thread training step 18% slower;
``benchmarks/bench_deploy.py``: each node's training message 12.5-13.9 s against 11 s per
client in the simulation).

``fedtune deploy superlink --nice N`` (default :data:`SUPERLINK_NICE`) and ``fedtune deploy
supernode --nice N`` (default :data:`SUPERNODE_NICE`) therefore start Flower's processes
(and so every process they start: the ServerApp, the SuperExecs, the ClientApps) ``N``
steps nicer than the caller; a node's worker keeps the caller's priority. Linux shares CPU
between sessions' *autogroups* before nice values count, so each such process also gets a
session of its own whose autogroup is ``N`` steps nicer (best effort: where autogroups are
off, or their rate limit refuses, plain nice values still order processes of one session,
which is how the walkthrough's commands, typed in one shell, run). ``--nice 0`` starts them
as before. A machine with nothing else to run gives the control plane every cycle it
wants either way.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from fedtune import procs
from fedtune.errors import ConfigError

__all__ = ["SUPERLINK_NICE", "SUPERNODE_NICE", "check_nice", "lower_priority"]

#: The SuperLink, its gateway and the ServerApp (they run while the nodes are idle, or far away).
SUPERLINK_NICE = 19
#: A SuperNode, its SuperExec and ClientApps: a ClientApp must still start while another
#: co-located node trains, so its node's message is ready when the turn comes.
SUPERNODE_NICE = 10


def check_nice(value: int, option: str = "--nice") -> int:
    """``value`` if it is a niceness step from 0 to 19, else a one-line error."""
    if not 0 <= value <= 19:
        raise ConfigError(f"{option} must be from 0 to 19, got {value}.")
    return value


def lower_priority(steps: int) -> None:
    """In a child before ``exec`` (``preexec_fn``): ``steps`` nicer, process and autogroup.

    The child must be a session leader (``start_new_session=True``) for the autogroup to
    be its own; errors are ignored, the priority being a courtesy, never a condition.
    In a session of its own the child no longer gets its terminal's signals with its
    parent, so it also asks the kernel for SIGTERM when the parent dies (Linux
    ``PR_SET_PDEATHSIG``): a supervisor killed outright leaves no Flower process behind.
    """
    if steps <= 0:
        return
    with contextlib.suppress(OSError):
        os.nice(steps)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(steps))
    procs.prctl(procs.PR_SET_PDEATHSIG, signal.SIGTERM)
