"""A real federation on 127.0.0.1: Flower's SuperLink and SuperNodes, TLS and node auth on.

Every command here is one of the README's "Run a real federation" walkthrough
(``fedtune deploy ...``, ``fedtune keygen``, ``fedtune export``, ``fedtune audit``).
Each process the tests start carries an environment tag of its own, inherited by
everything it spawns (Flower's SuperExec, ServerApp and ClientApp processes start
sessions of their own, so process groups would miss them); each test ends by
checking that no tagged process is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import toy_instruction_rows, toy_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

TAG = "FEDTUNE_DEPLOY_TEST"
NODES = ("node-0", "node-1", "node-2")
LABELS = "animal,food,tool"
#: The limit the full run's nodes are registered with: each trains on 38 examples
#: (a limit of 16 dropped every reply, naming it), so honest counts pass 40.
MAX_EXAMPLES = 40

RUN_CONFIG = {
    "num-rounds": 3,
    "num-clients": 3,
    "min-clients": 2,
    "label-names": LABELS,
    "batch-size": 8,
    "learning-rate": 0.05,
    "optimizer": "sgd",
    "max-seq-length": 16,
    "dp": "example",
    "target-epsilon": 8.0,
    "encryption": True,
    "round-timeout": 150.0,
    "seed": 7,
}


#: Where the SuperNode's entry points for the runtime user live (see _runtime_bin).
RUNTIME_BIN = Path(tempfile.gettempdir()) / f"fedtune-deploy-bin-{os.getpid()}"


def _runtime_bin(user: pwd.struct_passwd) -> Path | None:
    """``flower-supernode`` and the commands it starts, runnable by ``user``, or None.

    A deployment installs Python where every user may run it. This machine's Python
    may sit under a 0700 ``/root``; then the SuperNode runs under the system
    ``python3.X`` of the same version, on this environment's own site-packages (pure
    Flower code; the ClientApp imports no torch), through two small entry points.
    """
    site = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    candidates = [
        Path(sys.executable),
        Path(f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"),
    ]
    for python in candidates:
        try:
            ok = (
                subprocess.run(
                    [str(python), "-c", "import flwr, fedtune.apps.client.app"],
                    user=user.pw_uid,
                    group=user.pw_gid,
                    extra_groups=[],
                    cwd="/",
                    env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"},
                    check=False,
                    capture_output=True,
                    timeout=120,
                ).returncode
                == 0
            )
        except OSError:  # not theirs to run
            ok = False
        if not ok:
            continue
        RUNTIME_BIN.mkdir(mode=0o755, exist_ok=True)
        for name, module, function in (
            ("flower-supernode", "flwr.supernode.cli", "flower_supernode"),
            ("flwr-clientapp", "flwr.supernode.cli", "flwr_clientapp"),
            ("flower-superexec", "flwr.supercore.cli", "flower_superexec"),
        ):
            script = RUNTIME_BIN / name
            script.write_text(
                f"#!{python}\nimport sys\nsys.path[:0] = [{str(site)!r}, {str(ROOT)!r}]\n"
                f"from {module} import {function}\nsys.exit({function}())\n"
            )
            script.chmod(0o755)
        return RUNTIME_BIN
    return None


def _runtime_user() -> str | None:
    """``nobody`` when this test runs as root and ``nobody`` can run a SuperNode here."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return "nobody" if _runtime_bin(user) is not None else None


#: The user the SuperNodes (and every ClientApp) run as, where the test can switch users.
RUNTIME_USER = _runtime_user()


def _fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


def _env(tag: str) -> dict[str, str]:
    env = dict(os.environ)
    env[TAG] = tag
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if RUNTIME_USER:  # the SuperNode's entry points, found first
        env["PATH"] = f"{RUNTIME_BIN}{os.pathsep}{env['PATH']}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _tagged(prefix: str) -> dict[int, str]:
    """Live processes whose environment carries a tag starting with ``prefix``."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        for item in environ:
            if item.startswith(f"{TAG}={prefix}".encode()) and state != "Z":
                found[int(entry.name)] = item.decode().split("=", 1)[1]
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Files:
    """What the operator and the nodes made before the federation starts."""

    root: Path
    certs: Path
    ca: Path
    ckks: Path
    rogue_ckks: Path
    keys: Path
    data: dict[str, Path]
    config: Path
    runtime: Path  # runtime directories (outside pytest's 0700 tmp: the runtime user enters)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Files]:
    if RUNTIME_USER and not RUNTIME_BIN.is_dir():
        # Another module's `files` (test_policy_deploy_e2e imports this fixture) removed the
        # entry points at its teardown: the SuperNode as `nobody` would never come online.
        _runtime_bin(pwd.getpwnam(RUNTIME_USER))
    root = tmp_path_factory.mktemp("deploy")
    f = Files(
        root,
        root / "certs",
        root / "ca-offline",
        root / "ckks",
        root / "rogue-ckks",
        root / "keys",
        {n: root / f"{n}.csv" for n in NODES},
        root / "federation.toml",
        Path(tempfile.mkdtemp(prefix="fedtune-deploy-runtime-")),
    )
    f.runtime.chmod(0o711)
    for cmd in (
        _fedtune("deploy", "certs", "--out", str(f.certs), "--ca-dir", str(f.ca)),
        _fedtune("keygen", "--out", str(f.ckks)),
        _fedtune("keygen", "--out", str(f.rogue_ckks)),
        _fedtune("deploy", "node-key", "--out", str(f.keys), *NODES, "rogue"),
    ):
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    for i, path in enumerate(f.data.values()):  # each node's own, different data
        lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in toy_rows(16, seed=i)]
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)  # only the node's worker reads its data
    config = {**RUN_CONFIG, "model-path": str(tiny_model_dir)}
    f.config.write_text(
        "".join(
            f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
            for k, v in config.items()
        )
    )
    yield f
    subprocess.run(["rm", "-rf", str(f.runtime), str(RUNTIME_BIN)], check=False)


class Federation:
    """One SuperLink and its SuperNodes, started with `fedtune deploy` on 127.0.0.1."""

    def __init__(
        self,
        files: Files,
        name: str,
        *,
        config: Path | None = None,
        data: dict[str, Path] | None = None,
    ) -> None:
        self.files = files
        self.config = config or files.config
        self.data = data or files.data
        self.name = name
        self.dir = files.root / name
        self.tag = f"{uuid.uuid4().hex}-{name}"
        self.port = _free_port()  # the SuperLink itself: Control API (operator only)
        self.address = f"127.0.0.1:{self.port}"
        self.fleet_port = _free_port()  # the node-facing, Fleet-only gateway
        self.fleet_address = f"127.0.0.1:{self.fleet_port}"
        self.home = self.dir / "operator"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.registered = ""  # what `fedtune deploy register` printed
        self.online: set[int] = set()  # node ids online at the last wait_online
        self.run_output = ""

    # -- roles ---------------------------------------------------------------
    def _start(self, role: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{role}.log").open("ab")
        proc = subprocess.Popen(
            cmd,
            env=_env(f"{self.tag}/{role}"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[role] = proc
        return proc

    def log(self, role: str) -> str:
        path = self.dir / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._start(
            "superlink",
            _fedtune(
                "deploy",
                "superlink",
                "--certs",
                str(self.files.certs),
                "--state-dir",
                str(self.dir / "server-state"),
                "--control-port",
                str(self.port),
                "--fleet-port",
                str(self.fleet_port),
            ),
        )
        deadline = time.monotonic() + 60
        waiting = {self.port, self.fleet_port}
        while time.monotonic() < deadline:
            for port in list(waiting):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        waiting.discard(port)
            if not waiting:
                return
            time.sleep(0.5)
        raise AssertionError("SuperLink did not start:\n" + self.log("superlink"))

    def register(self, *names: str, max_examples: int | None = None) -> None:
        keys = [str(self.files.keys / f"{n}.pub") for n in names]
        limit = [] if max_examples is None else ["--max-examples", str(max_examples)]
        done = subprocess.run(
            _fedtune(
                "deploy",
                "register",
                "--superlink",
                self.address,
                "--ca",
                str(self.files.certs / "ca.crt"),
                "--home",
                str(self.home),
                *limit,
                *keys,
            ),
            env=_env(f"{self.tag}/register"),
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        self.registered = done.stdout

    def node_policy(self) -> list[str]:
        """The policy flags of a node whose owner agreed to this federation's config:
        its base model pinned and its token limit (the defaults would refuse both)."""
        import tomllib

        flat = tomllib.loads(self.config.read_text())
        flags = ["--max-seq-length", str(flat.get("max-seq-length", 48))]
        if flat.get("model-path"):
            flags += ["--model", str(flat["model-path"])]
        return flags

    def start_node(
        self,
        name: str,
        *,
        key: str = "",
        ckks: Path | None = None,
        policy: list[str] | None = None,
    ) -> None:
        self._start(
            name,
            _fedtune(
                "deploy",
                "supernode",
                "--superlink",
                self.fleet_address,
                "--ca",
                str(self.files.certs / "ca.crt"),
                "--key",
                str(self.files.keys / (key or name)),
                "--state-dir",
                str(self.state(name)),
                "--port",
                str(_free_port()),
                "--data-path",
                str(self.data.get(name, self.data["node-0"])),
                "--secret-context",
                str((ckks or self.files.ckks) / "secret.ctx"),
                "--name",
                name,
                *(self.node_policy() if policy is None else policy),
                *(
                    [
                        "--runtime-user",
                        RUNTIME_USER,
                        "--runtime-dir",
                        str(self.files.runtime / self.name / name),
                    ]
                    if RUNTIME_USER
                    else []
                ),
            ),
        )

    def state(self, name: str) -> Path:
        return self.dir / "nodes" / name

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        online = 0
        while time.monotonic() < deadline:
            done = subprocess.run(
                ["flwr", "supernode", "list", "fedtune", "--format", "json"],
                env={**_env(f"{self.tag}/list"), "FLWR_HOME": str(self.home)},
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            try:
                nodes = json.loads(done.stdout)["nodes"]
                online = sum(n["status"] == "online" for n in nodes)
            except (ValueError, KeyError):
                online = 0
            if online >= count:
                self.online = {int(n["node-id"]) for n in nodes if n["status"] == "online"}
                return
            time.sleep(2)
        raise AssertionError(f"{online} of {count} SuperNodes online")

    def run_cmd(self, run_dir: Path, *extra: str) -> list[str]:
        return _fedtune(
            "deploy",
            "run",
            str(self.config),
            "--superlink",
            self.address,
            "--ca",
            str(self.files.certs / "ca.crt"),
            "--home",
            str(self.home),
            "--run-dir",
            str(run_dir),
            "--public-context",
            str(self.files.ckks / "public.ctx"),
            *extra,
        )

    def launch(self, *, intruder: bool = False, max_examples: int | None = None) -> None:
        """SuperLink, registered keys, the three nodes (and one with another CKKS key)."""
        self.start_superlink()
        self.register(*NODES, *(["rogue"] if intruder else []), max_examples=max_examples)
        for name in NODES:
            self.start_node(name)
        if intruder:
            self.start_node("intruder", key="rogue", ckks=self.files.rogue_ckks)
        self.wait_online(len(NODES) + intruder)

    def start_run(self, run_dir: Path, *, until_round: int) -> subprocess.Popen[bytes]:
        """Submit in the background; return once round ``until_round`` is trained."""
        runner = subprocess.Popen(
            self.run_cmd(run_dir),
            env=_env(f"{self.tag}/run"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_trained(run_dir, until_round)
        return runner

    @staticmethod
    def wait_trained(run_dir: Path, rnd: int, timeout: float = 600) -> None:
        """Until the server has checkpointed round ``rnd``."""
        deadline = time.monotonic() + timeout
        state = run_dir / "checkpoint" / "state.json"
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if json.loads(state.read_text())["round"] >= rnd:
                    return
            time.sleep(0.2)
        raise AssertionError(f"round {rnd} never finished")

    def wait_log(self, role: str, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(role):
                return
            time.sleep(0.1)
        raise AssertionError(f"{role} never logged {text!r}:\n{self.log(role)[-3000:]}")

    def pids(self, role: str, command: bytes) -> list[int]:
        """Tagged processes of ``role`` whose command line contains ``command``."""
        found = []
        for pid in _tagged(f"{self.tag}/{role}"):
            with contextlib.suppress(OSError):
                if command in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def kill_worker(self, name: str) -> None:
        """SIGKILL one node's worker process (its SuperNode and supervisor live on)."""
        pids = self.pids(name, b"fedtune.node.worker")
        assert pids, f"no worker process for {name}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    def run(self, run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.run_cmd(run_dir, *extra),
            env=_env(f"{self.tag}/run"),
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )

    # -- failures and shutdown -----------------------------------------------
    def kill(self, role: str) -> None:
        """SIGKILL a role and everything it started: a machine that vanished."""
        for pid in _tagged(f"{self.tag}/{role}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.procs[role].wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM the nodes, then the SuperLink; escalate; nothing tagged may be left."""
        order = [r for r in self.procs if r != "superlink"] + ["superlink"]
        for role in order:
            proc = self.procs.get(role)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while (left := _tagged(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.5)
        commands = {}
        for pid in left:
            with contextlib.suppress(OSError):
                commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind: {left} {commands}"


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ledger(fed: Federation, name: str, kind: str | None = "train") -> list[dict[str, Any]]:
    """A node's ledger records of ``kind`` (training releases by default; None: all, DP
    held-out evaluations included)."""
    path = fed.state(name) / "privacy" / f"{name}.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if kind is None or r.get("kind", "train") == kind]


def _final_vector(run_dir: Path, secret: Path) -> np.ndarray:
    from fedtune.aggregation import WeightedSum
    from fedtune.run.checkpoint import load_checkpoint
    from fedtune.secure import make_codec

    ckpt = load_checkpoint(run_dir / "checkpoint")
    codec = make_codec("ckks", length=int(ckpt.payload["length"]), context=secret)
    return WeightedSum(codec.decode(ckpt.payload), ckpt.num_examples).mean()


@pytest.fixture(scope="module")
def full_run(files: Files) -> Iterator[tuple[Federation, Path]]:
    """Three registered nodes, DP and encryption on, three rounds, nobody fails."""
    fed = Federation(files, "full")
    try:
        fed.launch(max_examples=MAX_EXAMPLES)
        fed.start_node("rogue")  # its key was never registered
        run_dir = fed.dir / "server-run"
        done = fed.run(run_dir)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        fed.run_output = done.stdout + done.stderr
        yield fed, run_dir
    finally:
        fed.stop()


def test_secured_federation_ledgers_agree_with_server_metrics(
    full_run: tuple[Federation, Path],
) -> None:
    fed, run_dir = full_run
    records = _records(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["clients-trained"] == 3 for r in records[1:])
    for name in NODES:
        ledger = _ledger(fed, name)
        assert [e["round"] for e in ledger] == [1, 2, 3]
        for entry, record in zip(ledger, records[1:], strict=True):
            assert record["clients"][name]["epsilon"] == pytest.approx(entry["epsilon"])
        assert ledger[-1]["epsilon"] <= RUN_CONFIG["target-epsilon"] + 1e-9
    audit = subprocess.run(
        _fedtune("audit", str(fed.state("node-0")), "--json", "--no-plot"),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_registration_limits_reach_the_server_for_the_nodes_that_are_online(
    full_run: tuple[Federation, Path],
) -> None:
    fed, _ = full_run
    from fedtune.deploy.roles import node_limits

    limits = node_limits(fed.home)
    assert len(limits) == len(NODES) and set(limits.values()) == {MAX_EXAMPLES}
    assert set(limits) <= fed.online  # the ids registration gave are the nodes' own ids
    for node in limits:
        assert f"as node {node} (at most {MAX_EXAMPLES} examples per round" in fed.registered
        assert f"node {node} <= {MAX_EXAMPLES}" in fed.run_output


def test_unregistered_node_is_refused(full_run: tuple[Federation, Path]) -> None:
    fed, _ = full_run
    assert fed.procs["rogue"].wait(timeout=60) != 0
    assert "Exit Code: 305" in fed.log("rogue")  # Flower's "SuperNode not activated"
    assert "Failed to activate SuperNode" in fed.log("rogue")
    assert "the SuperLink refused this node" in fed.log("rogue")
    assert "No SuperNode found with the given public key" in fed.log("superlink")
    assert not (fed.state("rogue") / "privacy").exists()


def _listening(tag: str) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that a process tagged ``tag...`` listens on."""
    inodes: set[str] = set()
    for pid in _tagged(tag):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found: set[tuple[str, int]] = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            raw, port = cols[1].split(":")
            packed = bytes.fromhex(raw)
            if family == socket.AF_INET:
                packed = packed[::-1]
            else:
                packed = b"".join(packed[i : i + 4][::-1] for i in range(0, 16, 4))
            found.add((socket.inet_ntop(family, packed), int(port, 16)))
    return found


def test_tls_is_required_and_nothing_listens_beyond_loopback(
    full_run: tuple[Federation, Path],
) -> None:
    fed, _ = full_run
    import ssl

    for port in (fed.port, fed.fleet_port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            ctx = ssl.create_default_context(cafile=str(fed.files.certs / "ca.crt"))
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            untrusting = ssl.create_default_context()  # the system CAs do not know ours
            with pytest.raises(ssl.SSLCertVerificationError):
                untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
    server = _listening(f"{fed.tag}/superlink")
    assert ("127.0.0.1", fed.port) in server and ("127.0.0.1", fed.fleet_port) in server
    everyone = _listening(fed.tag)
    assert {addr for addr, _ in everyone} == {"127.0.0.1"}, everyone


def _post(fed: Federation, port: int, path: str, body: bytes = b"") -> tuple[int, str]:
    """An HTTPS POST with what every node has: the deployment's CA certificate."""
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=str(fed.files.certs / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def test_node_credentials_cannot_reach_the_control_api_through_the_fleet_port(
    full_run: tuple[Federation, Path], tmp_path: Path
) -> None:
    """A node knows the Fleet address, ca.crt and its own key; it must not run the federation."""
    fed, _ = full_run
    attacker = tmp_path / "attacker-home"  # the flwr CLI pointed at the node-facing port
    cli_env = {**_env(f"{fed.tag}/attacker"), "FLWR_HOME": str(attacker)}
    from fedtune.deploy.roles import write_connection

    write_connection(attacker, superlink_address=fed.fleet_address, ca=fed.files.certs / "ca.crt")
    rogue_pub = str(fed.files.keys / "rogue.pub")
    for args in (
        ["supernode", "register", rogue_pub, "fedtune"],
        ["supernode", "list", "fedtune"],
        ["ls", "fedtune"],
        ["run", str(Path(__file__).resolve().parents[1]), "fedtune"],
    ):
        done = subprocess.run(
            ["flwr", *args],
            env=cli_env,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0, (args, done.stdout, done.stderr)
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-runs"):
        assert _post(fed, fed.fleet_port, path)[0] == 404
    assert _post(fed, fed.fleet_port, "/v1/runtime/acquire-task")[0] == 404
    # the Fleet API itself lets no node register another: Flower refuses with node auth on
    status, _ = _post(fed, fed.fleet_port, "/v1/fleet/register-node")
    assert status >= 400
    # ... and the rogue key is still unknown to the SuperLink (operator's own view)
    listed = subprocess.run(
        ["flwr", "supernode", "list", "fedtune", "--format", "json"],
        env={**_env(f"{fed.tag}/list"), "FLWR_HOME": str(fed.home)},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    nodes = json.loads(listed.stdout)["nodes"]
    assert len(nodes) == len(NODES), nodes
    assert "refused" in fed.log("superlink") and "not a Fleet API call" in fed.log("superlink")


def test_node_export_writes_the_final_adapter(
    full_run: tuple[Federation, Path], files: Files, tmp_path: Path
) -> None:
    fed, run_dir = full_run
    out = tmp_path / "adapter"
    done = subprocess.run(
        _fedtune(
            "export",
            str(fed.state("node-1")),
            "--key",
            str(files.ckks / "secret.ctx"),
            "--out",
            str(out),
        ),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "fedtune.json").read_text())["round"] == 3
    node = _final_vector(fed.state("node-1"), files.ckks / "secret.ctx")
    server = _final_vector(run_dir, files.ckks / "secret.ctx")
    assert np.max(np.abs(node - server)) < 1e-6  # the same sum, decrypted on the node


def test_node_killed_in_round_two_and_node_with_wrong_ckks_key_are_left_out(
    files: Files,
) -> None:
    fed = Federation(files, "dropout")
    try:
        fed.launch(intruder=True)  # a registered node that holds another CKKS key
        run_dir = fed.dir / "server-run"
        runner = fed.start_run(run_dir, until_round=1)
        fed.kill("node-2")  # round 2 has just been sent out
        out, _ = runner.communicate(timeout=900)
        assert runner.returncode == 0, out.decode()[-3000:]
        records = _records(run_dir)
        assert [r["round"] for r in records] == [0, 1, 2, 3]
        assert "node-2" in records[1]["clients"]
        assert [r["clients-trained"] for r in records[1:]] == [3, 2, 2]
        assert "payload fingerprint" in records[1]["dropped"]["intruder"]
        assert "does not match" in records[1]["dropped"]["intruder"]
        assert "intruder" not in records[2]["clients"]
        reasons = records[2]["dropped"].values()
        assert any("Node Unavailable" in r or "no reply" in r for r in reasons), reasons
        ledger = _ledger(fed, "node-2")
        spent = [e["round"] for e in ledger]
        # Round 1 was released; round 2 only if it was recorded before the kill; never 3.
        assert spent in ([1], [1, 2])
        assert ledger[0]["epsilon"] == pytest.approx(records[1]["clients"]["node-2"]["epsilon"])
        for name in ("node-0", "node-1"):
            assert [e["round"] for e in _ledger(fed, name)] == [1, 2, 3]
    finally:
        fed.stop()


def test_worker_killed_mid_round_and_server_killed_after_round_two_count_each_round_once(
    files: Files, full_run: tuple[Federation, Path]
) -> None:
    """node-1's worker dies in round 2 (the node sits it out, is back for round 3); then
    the server machine dies after round 2 and the run resumes."""
    _, uninterrupted = full_run
    fed = Federation(files, "resume")
    for name in NODES:
        fed.state(name).mkdir(parents=True, mode=0o700)
        fed.state(name).chmod(0o700)
    try:
        fed.launch()
        run_dir = fed.dir / "server-run"
        runner = fed.start_run(run_dir, until_round=1)
        fed.wait_log("node-1", "round 2: train message")
        fed.kill_worker("node-1")  # mid-round: its reply never leaves
        fed.wait_trained(run_dir, 2)
        fed.kill("superlink")  # the server machine dies after round 2
        runner.communicate(timeout=300)
        assert runner.returncode != 0
        assert "the node worker stopped (exit -9); restarting it" in fed.log("node-1")
        fed.start_superlink()  # same state dir: registrations survive
        fed.wait_online(len(NODES), timeout=180)
        done = fed.run(run_dir, "--resume")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records = _records(run_dir)
        assert [r["round"] for r in records] == [0, 1, 2, 3]
        assert [r["clients-trained"] for r in records[1:]] == [3, 2, 3]
        reason = records[2]["dropped"]["node-1"]
        assert "worker-unavailable" in reason, reason  # the ClientApp's fixed code
        for name in ("node-0", "node-2"):  # round 3 counted once, even if half done
            assert [e["round"] for e in _ledger(fed, name)] == [1, 2, 3]
        ledger = _ledger(fed, "node-1")
        rounds = [e["round"] for e in ledger]
        # Round 2 is in the ledger only if it was recorded before the kill; never twice.
        assert rounds in ([1, 3], [1, 2, 3]), rounds
        assert ledger[-1]["epsilon"] == pytest.approx(records[3]["clients"]["node-1"]["epsilon"])
        secret = files.ckks / "secret.ctx"
        resumed, straight = _final_vector(run_dir, secret), _final_vector(uninterrupted, secret)
        # CSPRNG noise: a resumed run is not bit-identical to the uninterrupted one, but it
        # is the same federation (both learned from the same start; one release per round)
        assert np.all(np.isfinite(resumed)) and resumed.shape == straight.shape
        assert np.max(np.abs(resumed - straight)) < 10 * np.max(np.abs(straight))
    finally:
        fed.stop()


def test_the_supernode_and_its_client_apps_cannot_read_the_nodes_files(
    full_run: tuple[Federation, Path], files: Files
) -> None:
    """The SuperNode (and so every ClientApp it starts) runs as the runtime user."""
    if RUNTIME_USER is None:
        pytest.skip("running the SuperNode as `nobody` needs root and a Python `nobody` may run")
    fed, _ = full_run
    user = pwd.getpwnam(RUNTIME_USER)

    def uid(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1])

    node_files = []
    for name in NODES:
        supernodes = fed.pids(name, b"flower-supernode")
        workers = fed.pids(name, b"fedtune.node.worker")
        assert supernodes and workers, name
        assert {uid(pid) for pid in supernodes} == {user.pw_uid}
        assert {uid(pid) for pid in workers} == {os.geteuid()}
        node_files += [
            fed.data[name],
            files.ckks / "secret.ctx",
            fed.state(name) / "privacy" / f"{name}.jsonl",
            fed.state(name) / "checkpoint" / "state.json",
        ]
        assert "starting flower-supernode as nobody" in fed.log(name)
    assert all(path.exists() for path in node_files[:3])
    probe = (
        "import sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open(path, 'rb').close()\n"
        "        print('READ', path)\n"
        "    except OSError as err:\n"
        "        print('refused', type(err).__name__)\n"
    )
    # The interpreter the node's ClientApps run under (this one, or the system's).
    python = (RUNTIME_BIN / "flwr-clientapp").read_text().splitlines()[0][2:]
    done = subprocess.run(
        [python, "-c", probe, *map(str, node_files)],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "READ" not in done.stdout, done.stdout
    assert done.stdout.count("refused") == len(node_files), done.stdout + done.stderr


def test_causal_lm_federation_over_three_nodes(files: Files, tiny_llama_dir: Path) -> None:
    """Instruction tuning on real nodes: each node's own prompt/answer file, DP + CKKS."""
    fed = Federation(files, "causal")
    fed.dir.mkdir(parents=True, exist_ok=True)
    data = {}
    for i, name in enumerate(NODES):
        path = fed.dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in toy_instruction_rows(8, seed=i)))
        path.chmod(0o600)
        data[name] = path
    config = {
        **{k: v for k, v in RUN_CONFIG.items() if k != "label-names"},
        "task": "causal-lm",
        "model-path": str(tiny_llama_dir),
        "lora-target-modules": "q_proj,v_proj",
        "max-seq-length": 64,
        "num-rounds": 2,
    }
    fed.config = fed.dir / "causal.toml"
    fed.config.write_text(
        "".join(
            f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
            for k, v in config.items()
        )
    )
    fed.data = data
    try:
        fed.launch()
        run_dir = fed.dir / "server-run"
        done = fed.run(run_dir)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records = _records(run_dir)
        assert [r["round"] for r in records] == [0, 1, 2]
        assert [r["clients-trained"] for r in records[1:]] == [3, 3]
        for record in records:
            assert np.isfinite(record["eval-loss"]) and record["eval-examples"] > 0
        for name in NODES:
            ledger = _ledger(fed, name)
            assert [e["round"] for e in ledger] == [1, 2]
            # Each held-out reply was a DP release, in the same ledger (rounds 0, 1, 2).
            assert [e["round"] for e in _ledger(fed, name, "eval")] == [0, 1, 2]
            assert ledger[-1]["epsilon"] <= RUN_CONFIG["target-epsilon"] + 1e-9
    finally:
        fed.stop()
