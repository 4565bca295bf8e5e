"""A deployed round against a simulated one: the README walkthrough, measured in one run.

    python benchmarks/bench_deploy.py [--rounds 2] [--keep DIR]

Runs the walkthrough of docs/deployment.md on 127.0.0.1 (``fedtune keygen``,
``deploy certs``, ``superlink``, ``node-key``, ``register``, three ``supernode``s on
``scripts/make_demo_data.py``'s files, ``deploy run simulations/federation.toml``: the default
model, DP-SGD at ε = 8 and CKKS), then ``fedtune simulate simulations/federation.toml``: the
same three partitions (``make_demo_data.py`` draws them with the simulation's own
partitioner and seed), the same config. Both with ``--set num-rounds=ROUNDS``. It prints

* each run's last round time (``round-seconds`` of ``metrics.jsonl``: its train exchange
  and the final evaluation) and their ratio, deployed / simulated (goal <= 1.25);
* the per-message overhead of the deployment: the last train exchange's wall time minus
  the slowest node's own time on that message (its worker's ``reply after`` log line).

The three nodes share this machine's cores as the walkthrough types them: each
``fedtune deploy supernode`` runs with its default ``--threads auto`` (the workers take
turns, each using every core for its message; ``fedtune/node/cores.py``); nothing here
sets ``OMP_NUM_THREADS``. ``--threads N`` passes a fixed count to every node instead.

Every process it starts carries an environment tag and is stopped at the end; nothing
listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "FEDTUNE_BENCH_DEPLOY"
NODES = 3
#: Seconds the idle deployment is watched for its own CPU use before the run.
IDLE_WINDOW = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


def _env(tag: str) -> dict[str, str]:
    return {
        **os.environ,
        TAG: tag,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _tagged(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if f"{TAG}={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def _cpu_seconds(tag: str) -> float:
    """CPU seconds (user + system) the live processes carrying ``tag`` have used."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in _tagged(tag):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _run(cmd: list[str], tag: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd, env=_env(tag), cwd=ROOT, capture_output=True, text=True, check=False, **kwargs
    )  # type: ignore[call-overload]
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _last_round(run_dir: Path) -> dict[str, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1]


def deployed(
    work: Path, rounds: int, tag: str, threads: str | None = None
) -> tuple[dict[str, float], float, float]:
    """The walkthrough; (last record, wall seconds of `deploy run`, slowest node's message)."""
    data, ckks, certs = work / "data", work / "ckks", work / "certs"
    control, fleet = _free_port(), _free_port()
    _run(
        [sys.executable, "scripts/make_demo_data.py", "--nodes", str(NODES), "--out", str(data)],
        tag,
    )
    _run(_fedtune("keygen", "--out", str(ckks)), tag)
    _run(_fedtune("deploy", "certs", "--out", str(certs), "--ca-dir", str(work / "ca")), tag)
    logs = {}
    procs = []

    def start(role: str, cmd: list[str]) -> None:
        logs[role] = work / f"{role}.log"
        env = _env(tag)
        with logs[role].open("wb") as out:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    start(
        "superlink",
        _fedtune(
            "deploy",
            "superlink",
            "--certs",
            str(certs),
            "--state-dir",
            str(work / "server-state"),
            "--fleet-port",
            str(fleet),
            "--control-port",
            str(control),
        ),
    )
    names = [f"node-{k}" for k in range(NODES)]
    _run(_fedtune("deploy", "node-key", "--out", str(work / "keys"), *names), tag)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", control)) == 0:
                break
        time.sleep(0.5)
    connection = ["--superlink", f"127.0.0.1:{control}", "--ca", str(certs / "ca.crt")]
    _run(
        _fedtune(
            "deploy",
            "register",
            *connection,
            "--home",
            str(work / "operator"),
            *(str(work / "keys" / f"{n}.pub") for n in names),
        ),
        tag,
    )
    for name in names:
        start(
            name,
            _fedtune(
                "deploy",
                "supernode",
                "--superlink",
                f"127.0.0.1:{fleet}",
                "--ca",
                str(certs / "ca.crt"),
                "--key",
                str(work / "keys" / name),
                "--state-dir",
                str(work / "nodes" / name),
                "--port",
                str(_free_port()),
                "--data-path",
                str(data / f"{name}.csv"),
                "--secret-context",
                str(ckks / "secret.ctx"),
                "--name",
                name,
                *(["--threads", threads] if threads else []),
            ),
        )
    deadline = time.monotonic() + 600
    # (A node of a fedtune without the worker says only that its SuperNode started.)
    started = ("node worker ready", "Starting Flower SuperNode")
    while not all(any(x in logs[n].read_text() for x in started) for n in names):
        if time.monotonic() > deadline:
            raise SystemExit("the node workers did not start:\n" + logs[names[0]].read_text())
        time.sleep(1)
    time.sleep(5)  # the SuperNodes connect
    idle = _cpu_seconds(tag)
    time.sleep(IDLE_WINDOW)
    idle_share = (_cpu_seconds(tag) - idle) / IDLE_WINDOW
    print(f"idle deployment (SuperLink, {NODES} nodes): {100 * idle_share:.1f}% of one core")
    run_dir = work / "server-run"
    start_wall = time.perf_counter()
    _run(
        _fedtune(
            "deploy",
            "run",
            "simulations/federation.toml",
            "--set",
            f"num-rounds={rounds}",
            *connection,
            "--home",
            str(work / "operator"),
            "--run-dir",
            str(run_dir),
            "--public-context",
            str(ckks / "public.ctx"),
            "--quiet",
        ),
        tag,
        timeout=7200,
    )
    wall = time.perf_counter() - start_wall
    # The slowest node's own time on the last round's train message.
    pattern = re.compile(rf"round {rounds}: train reply after ([0-9.]+) s")
    times = [float(m.group(1)) for n in names for m in pattern.finditer(logs[n].read_text())]
    worker = max(times) if times else float("nan")  # nan: no worker (an older fedtune)
    for proc in procs[1:] + procs[:1]:  # the nodes, then the SuperLink
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (left := _tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return _last_round(run_dir), wall, worker


def simulated(work: Path, rounds: int, tag: str) -> tuple[dict[str, float], float]:
    run_dir = work / "sim-run"
    start = time.perf_counter()
    _run(
        _fedtune(
            "simulate",
            "simulations/federation.toml",
            "--set",
            f"num-rounds={rounds}",
            "--run-dir",
            str(run_dir),
        ),
        tag,
        timeout=7200,
    )
    return _last_round(run_dir), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the runs' files in this directory")
    parser.add_argument(
        "--threads",
        help="torch threads for every node (`deploy supernode --threads`); default: its `auto`",
    )
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="fedtune-bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    try:
        dep, dep_wall, worker = deployed(work / "deployed", args.rounds, tag, args.threads)
        sim, sim_wall = simulated(work / "simulated", args.rounds, tag)
    finally:
        for pid in _tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nmachine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}; nodes' threads: {args.threads or 'auto'}"
    )
    print(
        f"\n{'':<10} {'wall s':>8} {'last round s':>13} {'train exchange s':>17} "
        f"{'eval s':>7} {'accuracy':>9} {'epsilon':>8}"
    )
    nan = float("nan")
    for name, rec, wall in (("deployed", dep, dep_wall), ("simulated", sim, sim_wall)):
        print(
            f"{name:<10} {wall:>8.1f} {rec['round-seconds']:>13.1f} {rec['train-seconds']:>17.1f} "
            f"{rec.get('eval-seconds', nan):>7.1f} {rec.get('eval-accuracy', nan):>9.3f} "
            f"{rec.get('epsilon', nan):>8.3f}"
        )
    print(
        f"\nlast round, deployed / simulated: {dep['round-seconds'] / sim['round-seconds']:.3f} "
        "(goal <= 1.25)"
    )
    print(
        f"per-message overhead of the deployment (last train exchange {dep['train-seconds']:.1f} s "
        f"- slowest node's own {worker:.1f} s): {dep['train-seconds'] - worker:.1f} s"
    )


if __name__ == "__main__":
    main()
