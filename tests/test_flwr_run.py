"""``flwr run .`` on Flower's local simulation: the Flower-native way beside ``fedtune simulate``.

The ``flwr`` CLI starts a local SuperLink (simulation mode, bound to 127.0.0.1) that
outlives ``flwr run``; the test stops it and everything it started, and checks that
nothing is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    out: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out[int(entry.name)] = (ppid, cmdline)
    return out


def _started_by(marker: str) -> set[int]:
    """Processes whose command line names ``marker``, and all their descendants."""
    procs = _processes()
    found = {pid for pid, (_, cmd) in procs.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        grew = bool(children)
        found |= children
    return found


def _stop(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            _reap(pids)
            time.sleep(0.2)
        pids = {p for p in pids if Path(f"/proc/{p}").exists()}
        if not pids:
            return


def _reap(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _flwr_run(cwd: Path, env: dict[str, str], run_config: str) -> str:
    """``flwr run REPO`` with two simulated SuperNodes; returns the Flower run id."""
    flwr = str(Path(sys.executable).with_name("flwr"))
    proc = subprocess.run(
        [
            flwr,
            "run",
            str(REPO),
            "--federation-config",
            "num-supernodes=2",
            "--run-config",
            run_config,
            "--stream",
        ],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    match = re.search(r"Successfully started run (\d+)", output)
    assert match, output[-3000:]
    return match.group(1)


@pytest.mark.slow
def test_flwr_run_dot_on_a_local_simulation(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # The app runs in this environment: Flower must not build one per run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    # DP on: a deployed node would refuse it without a state-dir, a simulated one keeps
    # its ledger in RUN_DIR/privacy. No label-names: the default data's are used.
    run_config = (
        f'model-path="{tiny_model_dir}" num-rounds=1 examples-per-label=10 '
        'dp="example" target-epsilon=50.0 seeded-noise=true batch-size=8'
    )
    try:
        first = _flwr_run(tmp_path, env, run_config)
        second = _flwr_run(tmp_path, env, run_config)  # a second run needs no new run-dir
    finally:
        _stop(_started_by(str(home)))
    assert first != second
    for run_id in (first, second):
        run_dir = tmp_path / "runs" / f"flwr-{run_id}"
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2, lines  # round 0 and round 1
        assert (run_dir / "checkpoint").is_dir() and (run_dir / "config.toml").is_file()
        assert (
            'label-names = "animal,plant,food,person,artifact,location,body,substance"'
            in (run_dir / "config.toml").read_text()
        )
        ledgers = sorted(p.name for p in (run_dir / "privacy").glob("*.jsonl"))
        assert ledgers == ["client-0.jsonl", "client-1.jsonl"], ledgers
    assert not _started_by(str(home)), "processes of the local SuperLink are left running"


def test_the_server_knows_the_default_datas_labels_and_needs_them_for_own_data() -> None:
    from fedtune.apps.server.app import with_default_labels
    from fedtune.config import parse_run_config

    cfg = with_default_labels(parse_run_config({}))
    assert cfg.data.labels == [
        "animal", "plant", "food", "person", "artifact", "location", "body", "substance"
    ]  # fmt: skip
    picked = with_default_labels(parse_run_config({"label-names": "food,plant"}))
    assert picked.data.labels == ["food", "plant"]
    own = with_default_labels(parse_run_config({"data-path": "mine.csv"}))
    assert own.data.labels == []  # the server cannot read the nodes' files: it must be told


def test_an_encrypted_run_without_the_public_context_is_refused() -> None:
    from fedtune.apps.server.app import check_keys
    from fedtune.config import ConfigError, Wiring, parse_run_config

    with pytest.raises(
        ConfigError, match=r"`encryption` = true needs the server's `public-context`"
    ):
        check_keys(parse_run_config({"encryption": True}), Wiring())
    check_keys(parse_run_config({"encryption": True}), Wiring(public_context=Path("p.ctx")))
    check_keys(parse_run_config({}), Wiring())


def test_only_flowers_simulation_engine_counts_as_a_simulation() -> None:
    from fedtune.apps.client.app import simulated_node

    # Not in a Ray actor (this process), or a node config a real node has: not simulated.
    assert not simulated_node({"partition-id": 0, "num-partitions": 2})
    assert not simulated_node({"partition-id": 0, "num-partitions": 2, "state-dir": "/s"})


def test_each_flower_run_gets_its_own_run_dir() -> None:
    from fedtune.config import Wiring

    assert Wiring().run_dir_for(17) == Path("runs/flwr-17")
    assert Wiring().run_name(17) == "flwr-17"
    assert Wiring(run_dir=Path("/x/r1")).run_dir_for(17) == Path("/x/r1")
    assert Wiring(run_dir=Path("/x/r1"), run_id="a").run_name(17) == "a"
