"""``fedtune deploy supernode``: the node's worker and its SuperNode, each as its own user.

The worker (:mod:`fedtune.node.worker`) runs as the user who starts this command, the
owner of the node's files: its data, ``secret.ctx`` and ``--state-dir`` (ledger, noise
state, last global sum); that is root when the SuperNode is to run as another user,
unless ``--worker-user`` names a third one it drops to after binding its socket.
With ``--runtime-user USER`` (as root) the SuperNode, and so every ClientApp process
it starts whatever app the SuperLink sent, runs as ``USER``, who can reach the
worker's socket (mode 0600, owned by ``USER``) and the runtime directory, and nothing
of the node's own: this module checks that before it starts anything, by trying as
``USER`` (:func:`readable_by`).

The supervisor restarts a worker that dies (the round it was in drops the node; the
node is back for the next one) and stops both when either the SuperNode ends or it
gets SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from fedtune import procs
from fedtune.deploy import roles
from fedtune.deploy.priority import SUPERNODE_NICE
from fedtune.deploy.roles import Launch
from fedtune.deploy.supernode_waits import write_clientapp_launcher, write_launcher
from fedtune.deploy.users import (  # noqa: F401 - re-exported: fedtune deploy's one entry point
    RuntimeUser,
    _runs,
    _test_as,
    _write_for,
    flower_program,
    prepare_runtime,
    readable_by,
    runtime_user,
    worker_user,
)
from fedtune.errors import ConfigError
from fedtune.identity import ANY, read_node_key, read_public_key
from fedtune.model.loading import model_digest
from fedtune.node.channel import wait_ready
from fedtune.privacy.policy import NodePolicy
from fedtune.privacy.policy_file import load_policy, write_policy

__all__ = [
    "RuntimeUser",
    "policy_settings",
    "write_node_policy",
    "prepare_runtime",
    "start_node",
    "readable_by",
    "runtime_user",
    "supervise_node",
    "worker_user",
]


def _wait_ready(worker: subprocess.Popen[bytes], socket: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            return False
        if socket.exists() and wait_ready(str(socket), timeout=2):
            return True
        time.sleep(0.2)
    return False


def supervise_node(
    worker: Launch,
    node: Launch,
    *,
    socket: Path,
    user: RuntimeUser | None,
    key: Path,
    ready_timeout: float = 600.0,
) -> int:
    """Run the worker, then the SuperNode; restart the worker if it dies; stop both at the end."""
    children: dict[str, subprocess.Popen[bytes]] = {}
    relay = procs.StopRelay(children.values())

    def start_worker() -> subprocess.Popen[bytes]:
        print("fedtune deploy: starting the node worker", file=sys.stderr, flush=True)
        proc = subprocess.Popen(worker.argv, env=worker.env)
        children["worker"] = proc
        return proc

    try:
        proc = start_worker()
        if not _wait_ready(proc, socket, ready_timeout):
            if relay.stopping:
                return 0
            print(
                f"fedtune deploy supernode: error: the node worker did not become ready on "
                f"{socket} (exit {proc.poll()}); see its log above.",
                file=sys.stderr,
            )
            return 1
        print(
            f"fedtune deploy: node worker ready on {socket}; starting flower-supernode"
            + (f" as {user.name}" if user else ""),
            file=sys.stderr,
            flush=True,
        )
        extra = (
            {
                "user": user.uid,
                "group": user.gid,
                "extra_groups": [],
                "cwd": str(socket.parent / "flwr-home"),
            }
            if user
            else {}
        )
        children["supernode"] = subprocess.Popen(  # type: ignore[call-overload]
            node.argv, env=node.env, **extra, **node.popen_kwargs()
        )
        backoff, up_since = 1.0, time.monotonic()
        while not relay.stopping and children["supernode"].poll() is None:
            time.sleep(0.2)
            worker_proc = children["worker"]
            if worker_proc.poll() is not None and not relay.stopping:
                if time.monotonic() - up_since > 60:
                    backoff = 1.0
                print(
                    f"fedtune deploy supernode: the node worker stopped (exit "
                    f"{worker_proc.returncode}); restarting it in {backoff:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                if not relay.stopping:
                    start_worker()
                    up_since = time.monotonic()
    finally:
        # The SuperNode's own children (its SuperExec and the ClientApps it started) are
        # stopped with it: found now, before they are orphaned.
        below = [p for child in children.values() for p in procs.descendants(child.pid)]
        procs.end_children(children.values())
        procs.stop_processes(below, grace=10.0)
        # A worker that dropped to --worker-user cannot remove its socket from our
        # directory; without it a ClientApp knows at once that no worker is coming.
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(socket).st_mode):
                socket.unlink()
    if relay.stopping:
        return 0
    code = children["supernode"].returncode
    if code > 0:  # Flower exits 1 on any error; its log line above has the code (305: refused)
        print(
            f"fedtune deploy supernode: error: flower-supernode stopped (exit {code}). If it "
            "says 'Failed to activate SuperNode' (Exit Code 305), the SuperLink refused this "
            f"node: its key {str(key)!r} is not registered there (the operator runs `fedtune "
            f"deploy register ... {key.name}.pub`), or --superlink / --ca point elsewhere.",
            file=sys.stderr,
        )
    return code


def policy_settings(args: argparse.Namespace) -> dict[str, object]:
    """The privacy-policy flags given on the command line, as node-config keys.

    ``--model DIR`` is pinned here, by the SHA-256 of its files
    (:func:`fedtune.model.loading.model_digest`): the node owner's choice, made once.
    """
    out: dict[str, object] = {}
    for key in (
        "delta",
        "test-fraction",
        "max-seq-length",
        "evaluation",
        "eval-noise-multiplier",
        "max-step-slack",
    ):
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            out[key] = value
    peers = getattr(args, "peer", None) or []
    if ANY in peers and len(peers) > 1:
        raise ConfigError(
            f"--peer any trusts the server's roster and cannot go with pinned peers {peers!r}; "
            "give either `--peer any` or the peers' .pub files."
        )
    if peers:
        out["peers"] = ANY if peers == [ANY] else [read_public_key(Path(p)) for p in peers]
    models = getattr(args, "model", None) or []
    if models:
        pins = []
        for directory in models:
            path = Path(directory).expanduser().resolve()
            pins.append({"path": os.path.normpath(str(path)), "sha256": model_digest(path)})
        out["models"] = pins
    return out


def write_node_policy(
    state: Path, config: dict[str, object], *, owner: RuntimeUser | None = None
) -> NodePolicy:
    """Check the node's policy (``STATE_DIR/policy.toml`` and its flags) and write it back.

    The file then holds what the worker enforces and what ``fedtune audit STATE_DIR``
    audits at; with ``--worker-user`` it belongs to that user.
    """
    policy = load_policy(state, config)
    path = write_policy(state, policy)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
    return policy


def start_node(args: argparse.Namespace, config: dict[str, object]) -> int:
    """Start the node's worker, then its SuperNode (as ``--runtime-user`` if given)."""
    user = runtime_user(args.runtime_user)
    worker_config = dict(config)
    read_node_key(args.key)  # the worker signs its ceremony announcements with it
    worker_config["node-key"] = str(args.key.resolve())
    state = Path(str(worker_config["state-dir"]))
    runtime = roles.runtime_dir(state, args.runtime_dir, runtime_user=args.runtime_user)
    socket = runtime / roles.WORKER_SOCKET
    worker = roles.node_worker(
        config=worker_config,
        socket=socket,
        runtime_user=user.name if user else None,
        threads=getattr(args, "threads", "auto"),
    )
    owner: RuntimeUser | None = None
    if args.worker_user:
        owner = worker_user(args.worker_user, state=state, runtime=user)
        for option, name in (
            ("--data-path", "data-path"),
            ("--secret-context", "secret-context"),
            ("--key", "node-key"),
        ):
            if name in worker_config and not readable_by(owner, Path(str(worker_config[name]))):
                raise ConfigError(
                    f"--worker-user {owner.name!r} cannot read {option} {worker_config[name]!r}; "
                    f"give it to them (`chown {owner.name} {worker_config[name]}`)."
                )
        worker.argv.append(f"--user={owner.name}")
        worker.env["HOME"] = str(state)
    policy = write_node_policy(state, worker_config, owner=owner)
    print(
        f"fedtune deploy: node policy δ={policy.delta:g}, ε budget {policy.epsilon_budget:g}, "
        f"test-fraction {policy.test_fraction:g}, max-seq-length {policy.max_seq_length}, "
        f"{len(policy.models)} pinned model(s), "
        + (
            "multiparty roster: trusts the server's (--peer any)"
            if policy.peers == ANY
            else f"{len(policy.peers)} pinned peer(s)"
        )
        + f" (in {state / 'policy.toml'})",
        file=sys.stderr,
        flush=True,
    )
    private = {"--state-dir": state}
    for option, name in (("--data-path", "data-path"), ("--secret-context", "secret-context")):
        if name in worker_config:
            private[option] = Path(str(worker_config[name]))
    key, ca = prepare_runtime(
        runtime, user, private=private, key=args.key.resolve(), ca=args.ca.resolve()
    )
    # Flower's SuperNode, with its idle waits shortened, and its ClientApp's entry with a
    # leaner import (Flower's own programs where that cannot be): fedtune/deploy/supernode_waits.py
    bin_dir = runtime / "bin"
    bin_dir.mkdir(mode=0o755, exist_ok=True)
    stock = flower_program()
    program = write_launcher(stock, bin_dir) or stock
    lean = write_clientapp_launcher(flower_program("flwr-clientapp"), bin_dir)
    node_config: dict[str, object] = {"worker": str(socket)}
    if args.name:
        node_config["name"] = args.name
    launch = roles.supernode(
        superlink_address=args.superlink,
        ca=ca,
        key=key,
        port=args.port,
        host=args.host,
        config=node_config,
        home=runtime / "flwr-home",
        program=str(program),
    )
    # `--nice` was checked by `fedtune deploy` before any file was read
    launch = dataclasses.replace(launch, nice=getattr(args, "nice", SUPERNODE_NICE))
    if lean is not None:  # Flower's SuperExec finds `flwr-clientapp` on PATH
        launch.env["PATH"] = os.pathsep.join(filter(None, (str(bin_dir), launch.env.get("PATH"))))
    if user is not None:
        launch.env["HOME"] = str(runtime / "flwr-home")
    return supervise_node(worker, launch, socket=socket, user=user, key=args.key)
