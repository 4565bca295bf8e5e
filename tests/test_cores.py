"""A node's share of the cores (``fedtune deploy supernode --threads``, fedtune.node.cores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.deploy import roles
from fedtune.errors import ConfigError
from fedtune.node import cores


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cores.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(cores, "_registered", set())


def test_auto_shares_the_cores_among_live_workers() -> None:
    assert cores.threads_for("auto", cores=8) == 8  # nobody registered yet: all of them
    cores.register()
    assert cores.threads_for("auto", cores=8) == 8
    others = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])]
    others.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
    try:
        for p in others:
            cores.register(p.pid)
        assert cores.live_workers() == 3
        assert cores.threads_for("auto", cores=8) == 2
        assert cores.threads_for("auto", cores=2) == 1  # never 0
    finally:
        for p in others:
            p.kill()
            p.wait()
    assert cores.live_workers() == 1  # stopped workers' entries are removed
    assert cores.threads_for("auto", cores=8) == 8


def test_a_count_is_taken_as_given_and_nonsense_is_one_line() -> None:
    assert cores.threads_for("3", cores=2) == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ConfigError, match="--threads must be `auto` or a count >= 1"):
            cores.threads_for(bad, cores=2)


def test_node_threads_registers_the_worker_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cores.ENV, "auto")
    first = cores.node_threads()
    assert first >= 1
    assert cores.live_workers() == 1
    cores.node_threads()
    assert len(list(cores.registry_dir().iterdir())) == 1
    monkeypatch.setenv(cores.ENV, "5")
    assert cores.node_threads() == 5


def test_without_the_setting_omp_num_threads_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cores.ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cores.node_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cores.node_threads() == 0  # torch's own default


def test_the_worker_launch_carries_the_share(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = {"state-dir": str(state)}
    auto = roles.node_worker(config=config, socket=tmp_path / "w.sock", base_env={})
    assert auto.env[cores.ENV] == "auto" and "OMP_NUM_THREADS" not in auto.env
    one = roles.node_worker(config=config, socket=tmp_path / "w.sock", base_env={}, threads="1")
    assert one.env[cores.ENV] == "1" and one.env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ConfigError, match="--threads"):
        roles.node_worker(config=config, socket=tmp_path / "w.sock", base_env={}, threads="x")


def test_a_planted_registry_is_refused(tmp_path: Path) -> None:
    (tmp_path / f"fedtune-nodes-{__import__('os').getuid()}").write_text("not a dir")
    with pytest.raises(ConfigError, match="is not a directory of this user's"):
        cores.registry_dir()
