"""A node's share of the cores (``fedtune deploy supernode --threads``, fedtune.node.cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.deploy import roles
from fedtune.errors import ConfigError
from fedtune.node import cores


@pytest.fixture(autouse=True)
def _own_turn_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cores.tempfile, "gettempdir", lambda: str(tmp_path))


#: A worker stand-in: takes the turn, says so on stdout, holds it for argv[1] seconds.
HOLDER = """
import sys, time
from fedtune.node import cores
with cores.turn() as waited:
    print(f"in {time.time()} {waited}", flush=True)
    time.sleep(float(sys.argv[1]))
    print(f"out {time.time()}", flush=True)
"""


def _holder(tmp_path: Path, seconds: float) -> subprocess.Popen[str]:
    env = {**os.environ, cores.ENV: "auto", "TMPDIR": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(seconds)], env=env, stdout=subprocess.PIPE, text=True
    )


def test_auto_workers_take_turns_and_each_uses_every_core(tmp_path: Path) -> None:
    assert cores.threads_for("auto", cores=8) == 8
    assert cores.threads_for("auto", cores=2) == 2
    first = _holder(tmp_path, 3.0)
    assert first.stdout is not None
    entered = float(first.stdout.readline().split()[1])  # the first holds the turn now
    second = _holder(tmp_path, 0.0)
    with pytest.MonkeyPatch.context() as mp:  # this process too: told that it waits
        mp.setenv(cores.ENV, "auto")
        told: list[bool] = []
        with cores.turn(on_wait=lambda: told.append(True)) as waited:
            assert told == [True] and waited > 0.0
    out_second, _ = second.communicate(timeout=60)
    out_first, _ = first.communicate(timeout=60)
    released = float(out_first.split()[1])
    _, second_in, waited = out_second.splitlines()[0].split()
    assert float(second_in) >= released  # never both at once
    assert float(waited) > 0.5 and float(second_in) - entered >= 2.9


def test_a_worker_that_dies_releases_its_turn(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 60.0)
    assert holder.stdout is not None
    holder.stdout.readline()
    holder.kill()
    holder.wait()
    out, _ = _holder(tmp_path, 0.0).communicate(timeout=30)
    assert float(out.split()[2]) < 5.0


def test_without_auto_there_are_no_turns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cores.ENV, "1")
    with cores.turn() as waited:
        assert waited == 0.0
    assert not (tmp_path / f"fedtune-nodes-{os.getuid()}").exists()
    monkeypatch.setenv(cores.ENV, "auto")
    with cores.turn() as waited:
        assert waited < 5.0
    assert (cores.turn_dir() / cores.TURN_FILE).stat().st_mode & 0o777 == 0o600


def test_a_count_is_taken_as_given_and_nonsense_is_one_line() -> None:
    assert cores.threads_for("3", cores=2) == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ConfigError, match="--threads must be `auto` or a count >= 1"):
            cores.threads_for(bad, cores=2)


def test_node_threads_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cores.ENV, "auto")
    assert cores.node_threads() == (os.cpu_count() or 1)
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


def test_a_planted_turn_dir_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / f"fedtune-nodes-{os.getuid()}"
    planted.write_text("not a dir")
    with pytest.raises(ConfigError, match="is not a private directory of this user's"):
        cores.turn_dir()
    planted.unlink()
    planted.mkdir(mode=0o700)
    planted.chmod(0o777)  # anyone could plant the turn file: refused
    with pytest.raises(ConfigError, match="is not a private directory of this user's"):
        cores.turn_dir()
