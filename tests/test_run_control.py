"""Stopping, resuming and watching a simulation: real signals, a real pseudo-terminal.

The end-to-end test runs ``fedtune simulate`` on a tiny config-built BERT with seeded
DP noise twice: once straight through 3 rounds, once on a pseudo-terminal where a
Ctrl-C (the byte a terminal sends, so SIGINT reaches the whole process group, Ray
included) stops it after round 1, followed by ``--resume``. The resumed run must end
with the same adapter bytes, the same metrics rows and the same ledgers, leave no
process behind, and show progress only on the terminal. The unit tests drive
:class:`~fedtune.apps.simulation.signals.RunStop` and
:class:`~fedtune.apps.simulation.progress.RunProgress` in small subprocesses.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import session_processes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def wait_gone(sid: int, seconds: float = 15) -> set[int]:
    deadline = time.monotonic() + seconds
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


# -- RunStop in a small subprocess ---------------------------------------------------

STOP_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, threading, time
    from fedtune.apps.simulation.signals import RunStop
    stop = RunStop("resume with: X", print, None)
    hold = sys.argv[1] == "hold"
    with stop.installed():
        child = subprocess.Popen(["sleep", "300"])
        held = threading.Event()

        def write_forever():  # a run file being written for longer than the stop waits
            with stop.guard():
                held.set()
                time.sleep(300)

        if hold:
            threading.Thread(target=write_forever, daemon=True).start()
            held.wait()
        print("ready", child.pid, flush=True)
        time.sleep(300)
    """
)


def _start_stop_script(mode: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STOP_SCRIPT, mode],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return proc, int(line.split()[1])


def test_one_sigint_stops_the_children_and_says_how_to_resume() -> None:
    proc, child = _start_stop_script("free")
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: the whole group
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert time.monotonic() - start < 10
    assert "press Ctrl-C again to force" in out and "resume with: X" in out
    assert not wait_gone(proc.pid), "a child survived the stop"
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()


def test_a_second_sigint_forces_the_exit() -> None:
    proc, _ = _start_stop_script("hold")
    os.kill(proc.pid, signal.SIGINT)  # the stop now waits for the held write
    time.sleep(1.0)
    assert proc.poll() is None
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert time.monotonic() - start < 5
    assert "forced stop" in out
    assert "resume with: X" not in out
    assert not wait_gone(proc.pid)


# -- RunProgress on a pseudo-terminal and on a pipe ------------------------------------

PROGRESS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from fedtune.apps.simulation.progress import RunProgress
    run = Path(sys.argv[1])
    with RunProgress() as progress:
        progress.phase("loading the model")
        progress.watch(run, 3)
        time.sleep(0.6)
        events = [
            {"client": "client-0", "kind": "train", "round": 1, "event": "start"},
            {"client": "client-1", "kind": "train", "round": 1, "event": "start"},
            {"client": "client-0", "kind": "train", "round": 1, "event": "done"},
            {"client": "client-1", "kind": "train", "round": 1, "event": "error",
             "cause": "ValueError: batch too large"},
        ]
        (run / "client-events.jsonl").write_text("".join(json.dumps(e) + "\\n" for e in events))
        time.sleep(0.8)
        (run / "pending-round.json").write_text(json.dumps(
            [{"round": 1, "clients-trained": 1, "clients-sampled": 2, "train-seconds": 1.5}]))
        time.sleep(0.8)
    print("end", flush=True)
    """
)


def _run_on_pty(argv: list[str], *, cwd: Path, timeout: float) -> tuple[int, str]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader with the pty as its terminal
        os.chdir(cwd)
        os.execve(argv[0], argv, ENV)
    out = bytearray()
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        chunk = b""
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed its side
                chunk = b""
            out += chunk
        if status is None:
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else None
        if status is not None and not chunk:
            break
    os.close(fd)
    if status is None or not os.WIFEXITED(status):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"no exit in {timeout} s: {out.decode(errors='replace')[-2000:]}")
    return os.WEXITSTATUS(status), out.decode(errors="replace")


def test_progress_is_live_on_a_terminal(tmp_path: Path) -> None:
    code, out = _run_on_pty(
        [sys.executable, "-c", PROGRESS_SCRIPT, str(tmp_path)], cwd=ROOT, timeout=60
    )
    assert code == 0, out
    assert "loading the model" in out
    assert "clients done" in out
    assert "client-1 failed in train round 1: ValueError: batch too large" in out
    assert "round 1/3 trained  clients 1/2" in out


def test_progress_is_quiet_on_a_pipe(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROGRESS_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # A failure is still one line; the live line and the trained summary are not shown.
    assert "client-1 failed in train round 1: ValueError: batch too large" in proc.stderr
    assert "loading the model" not in proc.stderr
    assert "trained" not in proc.stderr
    assert "\x1b[" not in proc.stderr


# -- a real run: Ctrl-C on a terminal, resume, the same result -------------------------


def _run_args(model: Path, data: Path) -> list[str]:
    settings = {
        "model-path": model,
        "data-path": data,
        "num-clients": 2,
        "num-rounds": 3,
        "batch-size": 8,
        "lora-rank": 4,
        "max-examples": 60,
        "dp": "example",
        "noise-multiplier": 2.0,
        "seeded-noise": "true",
        "target-delta": 1e-3,
        "label-names": "animal,food,tool",
    }
    return [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock fields."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows.append({k: v for k, v in record.items() if not k.endswith("seconds")})
        for client in record.get("clients", {}).values():
            for key in [k for k in client if k.endswith("seconds")]:
                del client[key]
    return rows


def _ledgers(run_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for path in sorted((run_dir / "privacy").glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.name] = [
            tuple(sorted((k, v) for k, v in r.items() if k != "timestamp")) for r in records
        ]
    return out


def _popen(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert not wait_gone(proc.pid), "a process of the run survived it"
    return err


@pytest.mark.slow
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    """Seeded DP noise is drawn per release from the client's run nonce (its ledger's).

    Both runs are called ``run`` (the ledgers' run id) and share the clients' nonces:
    the uninterrupted one is started as the resume of a directory holding only the
    stopped run's config and nonce files, i.e. a run stopped before its first round.
    """
    args = _run_args(tiny_model_dir, toy_csv)
    cli = [sys.executable, "-m", "fedtune.cli", "simulate"]
    stopped = tmp_path / "stopped" / "run"
    stopped.parent.mkdir()

    # On a terminal, stopped by Ctrl-C once round 1 is in metrics.jsonl.
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        argv = [*cli, "--run-dir", str(stopped), *args]
        os.execve(argv[0], argv, ENV)
    out = bytearray()

    def read(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out.extend(os.read(fd, 65536))
                except OSError:
                    return

    deadline = time.monotonic() + 400
    metrics = stopped / "metrics.jsonl"
    while time.monotonic() < deadline:
        read(0.3)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
    else:
        raise AssertionError(out.decode(errors="replace")[-3000:])
    os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground group
    sent = time.monotonic()
    status = None
    while time.monotonic() - sent < 20:
        read(0.2)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
    took = time.monotonic() - sent
    read(0.5)
    os.close(fd)
    text = out.decode(errors="replace")
    if status is None or not os.WIFEXITED(status):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"still running {took:.0f} s after Ctrl-C: {text[-3000:]}")
    assert os.WEXITSTATUS(status) == 130, text[-3000:]
    assert took < 15
    assert not wait_gone(pid), "a process of the stopped run survived"
    assert f"fedtune simulate --resume {stopped}" in text
    assert "Traceback" not in text
    assert "clients done" in text or "trained" in text  # the live display ran
    assert (stopped / "checkpoint").is_dir() and not (stopped / "adapter").exists()

    # The same run uninterrupted, with the same clients' nonces (see the docstring).
    straight = tmp_path / "straight" / "run"
    (straight / "privacy").mkdir(parents=True)
    shutil.copy(stopped / "config.toml", straight / "config.toml")
    for nonces in (stopped / "privacy").glob("*.runs.json"):
        shutil.copy(nonces, straight / "privacy" / nonces.name)
    err = _finish(_popen([*cli, "--resume", str(straight)]))
    assert "trained" not in err and "clients done" not in err  # not a terminal: no live line

    err = _finish(_popen([*cli, "--resume", str(stopped)]))
    assert "resuming at round" in err

    assert _rows(stopped) == _rows(straight)
    assert [r["round"] for r in _rows(stopped)] == [0, 1, 2, 3]
    assert _ledgers(stopped) == _ledgers(straight)
    for ledger in _ledgers(stopped).values():  # one release per (round, kind): none twice
        releases = [(dict(r)["round"], dict(r)["kind"]) for r in ledger]
        assert len(releases) == len(set(releases)) == 7  # eval 0..3, train 1..3
    name = "adapter_model.safetensors"
    assert (stopped / "adapter" / name).read_bytes() == (straight / "adapter" / name).read_bytes()

    def adapter_config(run: Path) -> dict[str, Any]:
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set
        return config

    assert adapter_config(stopped) == adapter_config(straight)
