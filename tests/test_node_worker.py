"""The node worker and the thin ClientApp that forwards to it over a Unix socket.

The worker is started here as ``fedtune deploy supernode`` starts it
(``python -m fedtune.node.worker``), on a socket in a temporary directory, and is
stopped by the fixture; the end-to-end runs through a SuperNode are in
``tests/test_deploy_e2e.py``.
"""

from __future__ import annotations

import csv
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.errors import WorkerError, WorkerUnavailable
from fedtune.node.channel import HANDLE, forward, wait_ready
from fedtune.node.codes import NodeRefusal
from tests.conftest import node_pins, toy_rows

ROOT = Path(__file__).resolve().parents[1]
LABELS = "animal,food,tool"
AS_ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages built outside a running app need an identity (run_simulation sets the same).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    socket: Path
    node_config: dict[str, object]
    run_config: dict[str, object]
    log: Path


def _run_config(tiny_model_dir: Path) -> dict[str, object]:
    return {
        "model-path": str(tiny_model_dir),
        "label-names": LABELS,
        "max-seq-length": 16,
        "batch-size": 8,
        "learning-rate": 0.05,
        "optimizer": "sgd",
        "seed": 3,
        "num-clients": 1,
        "min-clients": 1,
    }


def _policy(tiny_model_dir: Path) -> dict[str, object]:
    """The node's own policy: the run config's base model pinned, its token limit."""
    return node_pins(tiny_model_dir, 16)


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path) -> Iterator[Worker]:
    """A node worker on its own data; as root its socket is handed to ``nobody``."""
    # Not under pytest's tmp dir (mode 0700, root's): `nobody` must reach the socket.
    root = Path(tempfile.mkdtemp(prefix="fedtune-worker-test-"))
    root.chmod(0o711)
    state, runtime = root / "state", root / "runtime"
    state.mkdir(mode=0o700)
    runtime.mkdir(mode=0o711)  # ours, as `fedtune deploy supernode` keeps it
    data = state / "own.csv"
    with data.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(toy_rows(8, seed=5))
    data.chmod(0o600)
    node_config = {
        "state-dir": str(state),
        "data-path": str(data),
        "name": "node-a",
        **_policy(tiny_model_dir),
    }
    socket = runtime / "worker.sock"
    argv = [
        sys.executable,
        "-m",
        "fedtune.node.worker",
        f"--socket={socket}",
        f"--node-config={json.dumps(node_config)}",
    ]
    if AS_ROOT:
        argv.append("--socket-owner=nobody")
    log = root / "worker.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        assert wait_ready(str(socket), timeout=180), log.read_text()
        yield Worker(proc, socket, node_config, _run_config(tiny_model_dir), log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _train_content(server_round: int = 1, *, evaluate: bool = True) -> RecordDict:
    config: dict[str, int] = {"server-round": server_round, "sampled-clients": 1}
    if evaluate:
        config["evaluate-round"] = server_round - 1
    return RecordDict({"config": ConfigRecord(config)})  # type: ignore[arg-type]


def test_the_thin_client_app_imports_no_torch() -> None:
    heavy = ("torch", "transformers", "peft", "opacus", "tenseal")
    code = (
        "import sys; import fedtune.apps.client.app; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_worker_trains_and_evaluates_as_the_in_process_round_code(worker: Worker) -> None:
    """One train message that also evaluates: the same reply the simulation path makes."""
    from fedtune.node.round import handle
    from fedtune.secure.plain import PlainCodec

    reply = forward(
        str(worker.socket), "train", _train_content(), run_id=7, run_config=worker.run_config
    )
    assert set(reply.config_records) == {"update", "info"}
    assert set(reply.metric_records) == {"metrics", "evaluation"}
    assert reply.config_records["info"]["client"] == "node-a"
    evaluation = reply.metric_records["evaluation"]
    assert set(evaluation) == {"num-examples", "eval-loss", "eval-accuracy", "partition-id"}
    # The server cannot point the worker at other files: its run config's paths are ignored.
    spoofed = {**worker.run_config, "data-path": "/etc/passwd", "state-dir": "/tmp/elsewhere"}
    again = forward(str(worker.socket), "train", _train_content(), run_id=8, run_config=spoofed)
    assert (
        again.metric_records["metrics"]["num-examples"]
        == (reply.metric_records["metrics"]["num-examples"])
    )
    assert not Path("/tmp/elsewhere").exists()
    # The same round code in this process, on a copy of the node's data.
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "own.csv"
        data.write_bytes(Path(str(worker.node_config["data-path"])).read_bytes())
        local = handle(
            "train",
            _train_content(),
            run_config=worker.run_config,
            node_config={
                "state-dir": tmp,
                "data-path": str(data),
                "name": "node-a",
                **_policy(Path(str(worker.run_config["model-path"]))),
            },
            run_id=7,
            deployed=True,
        )
    update, expected = reply.config_records["update"], local.config_records["update"]
    codec = PlainCodec(length=int(update["length"]))  # type: ignore[arg-type]
    np.testing.assert_allclose(
        codec.decode(dict(update)),  # type: ignore[arg-type]
        codec.decode(dict(expected)),  # type: ignore[arg-type]
        atol=1e-6,
    )
    assert dict(local.metric_records["evaluation"]) == pytest.approx(dict(evaluation))
    log = worker.log.read_text()
    assert "round 1: train message (run 7)" in log and "round 1: train reply after" in log


def test_the_worker_refuses_what_is_not_a_round_and_lives_on(worker: Worker) -> None:
    with grpc.insecure_channel(f"unix:{worker.socket}") as channel:
        call = channel.unary_unary(HANDLE)
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\x01 not a record dict", timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "bad-request"  # a fixed code; the text stays in the log
    with pytest.raises(WorkerError, match="^bad-request$"):
        forward(str(worker.socket), "query", RecordDict(), run_id=1, run_config={})
    with pytest.raises(WorkerError, match="^bad-request$"):
        forward(str(worker.socket), "train", RecordDict(), run_id=1, run_config=worker.run_config)
    with pytest.raises(WorkerError, match="^bad-request$"):
        content = RecordDict(
            {"config": ConfigRecord({"server-round": 1, "evaluate-round": 5})}  # type: ignore[dict-item]
        )
        forward(str(worker.socket), "train", content, run_id=1, run_config=worker.run_config)
    assert worker.proc.poll() is None
    assert wait_ready(str(worker.socket), timeout=10)
    log = worker.log.read_text()  # the details: in the worker's own log only
    assert "message-type must be 'train' or 'evaluate'" in log
    assert "(bad-request): server message asks to evaluate round 5" in log


def test_the_socket_is_0600_and_only_its_runtime_user_reads_nothing_else(worker: Worker) -> None:
    mode = worker.socket.lstat()
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600
    if not AS_ROOT:
        pytest.skip("handing the socket to another user needs root")
    nobody = pwd.getpwnam("nobody")
    assert mode.st_uid == nobody.pw_uid
    # As the runtime user (coreutils' `test`: access(2) with their ids): the socket is
    # theirs to connect to (write permission), the node's data and ledger are closed.
    from fedtune.deploy.node import RuntimeUser, readable_by

    user = RuntimeUser("nobody", nobody.pw_uid, nobody.pw_gid, nobody.pw_dir)

    def as_nobody(*args: str) -> bool:
        done = subprocess.run(
            ["test", *args],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            check=False,
        )
        return done.returncode == 0

    assert as_nobody("-S", str(worker.socket), "-a", "-w", str(worker.socket))
    state = Path(str(worker.node_config["state-dir"]))
    private = {**worker.run_config, "dp": "example", "target-epsilon": 8.0}
    reply = forward(str(worker.socket), "train", _train_content(), run_id=9, run_config=private)
    assert reply.metric_records["metrics"]["epsilon"] > 0
    ledger = state / "privacy" / "node-a.jsonl"
    assert ledger.is_file()
    for path in (Path(str(worker.node_config["data-path"])), ledger, state):
        assert not readable_by(user, path), path
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600  # the worker's umask: its files are its own


def test_a_client_app_that_cannot_reach_its_worker_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedtune.apps.client.app import make_client_app

    app = make_client_app()
    msg = Message(_train_content(), dst_node_id=1, message_type=MessageType.TRAIN)
    nowhere = tmp_path / "no-worker.sock"
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"worker": str(nowhere), "worker-wait": 60.0},
        state=RecordDict(),
        run_config={},
    )
    start = time.monotonic()
    with (
        caplog.at_level("WARNING", logger="fedtune.client"),
        pytest.raises(NodeRefusal, match="^worker-unavailable$"),
    ):
        app(msg, context)
    assert time.monotonic() - start < 15  # no socket: no worker is coming, no 60 s wait
    # The server gets the code; the node's own log has the details.
    assert "is not running (no socket) after waiting up to 60 s; the node" in caplog.text
    assert str(nowhere) in caplog.text
    bare = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with (
        caplog.at_level("WARNING", logger="fedtune.client"),
        pytest.raises(NodeRefusal, match="^node-error$"),
    ):
        app(msg, bare)
    assert "names no `worker`; start the node with `fedtune deploy" in caplog.text
    odd = Context(
        run_id=1,
        node_id=1,
        node_config={"worker": "x", "data-path": "/x"},
        state=RecordDict(),
        run_config={},
    )
    with (
        caplog.at_level("WARNING", logger="fedtune.client"),
        pytest.raises(NodeRefusal, match="^node-error$"),
    ):
        app(msg, odd)
    assert "unknown key(s) ['data-path']" in caplog.text


def test_a_message_to_a_worker_that_died_drops_the_node_with_a_reason(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Nothing listens on the socket file (a killed worker leaves it): unavailable, said so."""
    import socket as sockets

    path = tmp_path / "dead.sock"
    with sockets.socket(sockets.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening, then closed: like a dead worker's
    with pytest.raises(WorkerUnavailable, match="cannot reach this node's fedtune worker"):
        forward(str(path), "train", _train_content(), run_id=1, run_config={})


@pytest.mark.parametrize(
    ("node", "run", "match"),
    [
        ({"epsilon-budget": 4.0}, {"dp": "off"}, "own `epsilon-budget`, so it trains only with DP"),
        (
            {"secret-context": "/nonexistent/secret.ctx"},
            {"encryption": False},
            "holds a CKKS secret context, so it sends only encrypted updates",
        ),
    ],
)
def test_a_real_node_refuses_a_run_config_that_would_lower_its_protection(
    node: dict[str, object], run: dict[str, object], match: str, tmp_path: Path
) -> None:
    """Whatever the server (or an app on the node) sends: the node's own policy holds."""
    from fedtune.config import ConfigError
    from fedtune.node.round import runtime_for

    own = {"partition-id": 0, "num-partitions": 1, "state-dir": str(tmp_path), **node}
    with pytest.raises(ConfigError, match=match):
        runtime_for(run, own, run_id=1, deployed=True)
