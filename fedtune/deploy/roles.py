"""The command lines that start each role of a real federation on Flower's own engine.

fedtune adds no transport of its own: a deployment is Flower's ``flower-superlink``
(the server), one ``flower-supernode`` per data owner and the ``flwr`` CLI that
submits the run. This module only builds their command lines and environments,
always with

* TLS on (a CA and server certificate from :func:`fedtune.deploy.pki.make_tls`),
* SuperNode authentication on (``--enable-supernode-auth``; each node's public key
  registered with ``flwr supernode register``),
* runtime dependency installation off (the SuperLink's default is on; SuperNodes
  never install),
* ``FLWR_HOME`` set per process inside a directory the operator chose, so nothing
  lands in ``~`` by surprise, and model hubs offline,
* the SuperLink bound to ``127.0.0.1`` (its Control API accepts anyone who reaches
  it) and only its Fleet API on the node-facing address, through
  :mod:`fedtune.deploy.gateway`.

Every function returns a :class:`Launch` (argv + environment); ``fedtune deploy``
executes it. Values given to Flower's ``--node-config`` / ``--run-config`` are TOML.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fedtune.config import _toml_value
from fedtune.deploy.guard import check_superlink_dirs
from fedtune.deploy.pki import secret_dir
from fedtune.deploy.priority import lower_priority
from fedtune.deploy.supernode_waits import SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS
from fedtune.errors import ConfigError
from fedtune.ids import is_decimal, parse_decimal
from fedtune.node.cores import ENV as CORES_ENV
from fedtune.node.cores import threads_for

#: Environment every fedtune process of a deployment gets (no hub, no telemetry).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}

#: Where the SuperLink itself listens (Control, runtime and Fleet API together).
LOOPBACK = "127.0.0.1"

#: The name of the SuperLink connection fedtune writes into the operator's FLWR_HOME.
CONNECTION = "fedtune"


@dataclass(frozen=True)
class Launch:
    """A command line and the environment to run it in."""

    argv: list[str]
    env: dict[str, str]
    #: Steps nicer than the caller it runs (:mod:`fedtune.deploy.priority`); 0: the same.
    nice: int = 0

    def popen_kwargs(self) -> dict[str, Any]:
        """``subprocess.Popen`` keywords that start it ``nice`` steps nicer, in its own session."""
        if self.nice <= 0:
            return {}
        return {"start_new_session": True, "preexec_fn": partial(lower_priority, self.nice)}


def _file(path: Path, what: str, option: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{option} {str(path)!r} ({what}) does not exist.")
    return path


def _port(port: int, option: str) -> int:
    if not 0 < port < 65536:
        raise ConfigError(f"{option} must be in 1..65535, got {port}.")
    return port


def _address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not is_decimal(port, max_digits=5) or not 0 < int(port) < 65536:
        raise ConfigError(f"--superlink must be HOST:PORT, got {address!r}.")
    return address


def _environment(flwr_home: Path, base: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("MPLCONFIGDIR", str(flwr_home / "matplotlib"))
    return env


def superlink(
    *,
    certs: Path,
    state_dir: Path,
    control_port: int = 9093,
    base_env: Mapping[str, str] | None = None,
) -> Launch:
    """``flower-superlink`` with TLS, node authentication and a persistent database.

    Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr``: register
    nodes, submit runs) and the ServerApp's runtime API on this one listener, and
    its open-source Control API authenticates nobody. It is therefore bound to
    ``127.0.0.1:control_port`` only; nodes reach the Fleet API through
    :func:`fleet_gateway`. It refuses to start when a CKKS secret context or the
    CA's private key sits in ``certs`` or ``state_dir``
    (:func:`fedtune.deploy.guard.check_superlink_dirs`). The database in
    ``state_dir`` keeps registered nodes and runs across a restart; the ServerApp
    process inherits this environment (``FLWR_HOME`` = ``state_dir/flwr-home``).
    """
    certs = Path(certs).expanduser().resolve()
    state_dir = Path(state_dir).expanduser().resolve()
    ca = _file(certs / "ca.crt", "the CA certificate", "--certs")
    cert = _file(certs / "server.pem", "the server certificate", "--certs")
    key = _file(certs / "server.key", "the server key", "--certs")
    _port(control_port, "--control-port")
    check_superlink_dirs(certs=certs, state_dir=state_dir)
    secret_dir(state_dir, "--state-dir")
    home = state_dir / "flwr-home"
    home.mkdir(exist_ok=True, mode=0o700)
    argv = [
        "flower-superlink",
        f"--ssl-ca-certfile={ca}",
        f"--ssl-certfile={cert}",
        f"--ssl-keyfile={key}",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        f"--host={LOOPBACK}",
        f"--port={control_port}",
        f"--database={state_dir / 'superlink.db'}",
    ]
    return Launch(argv, _environment(home, base_env))


def fleet_gateway(
    *,
    certs: Path,
    host: str,
    port: int,
    control_port: int,
    base_env: Mapping[str, str] | None = None,
) -> Launch:
    """The node-facing Fleet-only listener (:mod:`fedtune.deploy.gateway`) on ``host:port``."""
    certs = Path(certs).expanduser().resolve()
    _port(port, "--fleet-port")
    if port == control_port:
        raise ConfigError(
            f"--fleet-port and --control-port must differ, both are {port}: nodes get the "
            "Fleet API only, the Control API stays on 127.0.0.1."
        )
    argv = [
        sys.executable,
        "-m",
        "fedtune.deploy.gateway",
        f"--host={host}",
        f"--port={port}",
        f"--upstream-port={control_port}",
        f"--certs={certs}",
    ]
    env = dict(os.environ if base_env is None else base_env)
    env.update(OFFLINE_ENV)
    return Launch(argv, env)


def node_config(
    *,
    state_dir: Path,
    data_path: Path | None = None,
    secret_context: Path | None = None,
    name: str = "",
    epsilon_budget: float | None = None,
    partition_id: int | None = None,
    num_partitions: int | None = None,
) -> dict[str, object]:
    """A node's own settings, as ``fedtune/apps/client/app.py`` reads them from its node config."""
    config: dict[str, object] = {"state-dir": str(Path(state_dir).expanduser().resolve())}
    if data_path is not None:
        config["data-path"] = str(_file(data_path, "this node's data", "--data-path"))
    if secret_context is not None:
        config["secret-context"] = str(
            _file(secret_context, "the CKKS secret context", "--secret-context")
        )
    if name:
        config["name"] = name
    if epsilon_budget is not None:
        if epsilon_budget <= 0:
            raise ConfigError(f"--epsilon-budget must be > 0, got {epsilon_budget}.")
        config["epsilon-budget"] = float(epsilon_budget)
    if (partition_id is None) != (num_partitions is None):
        raise ConfigError("--partition-id and --num-partitions go together.")
    if partition_id is not None and num_partitions is not None:
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(
                f"--partition-id must be in [0, {num_partitions}), got {partition_id}."
            )
        config["partition-id"] = partition_id
        config["num-partitions"] = num_partitions
    elif data_path is None:
        raise ConfigError(
            "A node needs its own data: --data-path FILE, or --partition-id and "
            "--num-partitions of the run's shared data set."
        )
    return config


#: The worker's socket in the node's runtime directory.
WORKER_SOCKET = "worker.sock"


def runtime_dir(state_dir: Path, runtime: Path | None, *, runtime_user: str | None) -> Path:
    """The SuperNode's own directory (its FLWR_HOME and the worker's socket).

    Without a runtime user it defaults to ``STATE_DIR/runtime``. With one it must be
    given and lie outside ``--state-dir``: the runtime user may enter it, and must
    never enter the state directory.
    """
    state_dir = Path(state_dir).expanduser().resolve()
    if runtime is None:
        if runtime_user:
            raise ConfigError(
                "--runtime-user needs --runtime-dir: a directory outside --state-dir for the "
                "SuperNode's own files and the worker's socket (the runtime user may enter it "
                "and must never enter --state-dir)."
            )
        return state_dir / "runtime"
    runtime = Path(runtime).expanduser().resolve()
    if runtime == state_dir or state_dir in runtime.parents or runtime in state_dir.parents:
        raise ConfigError(
            f"--runtime-dir {str(runtime)!r} must lie outside --state-dir {str(state_dir)!r} "
            "(and not contain it)."
        )
    return runtime


def node_worker(
    *,
    config: Mapping[str, object],
    socket: Path,
    runtime_user: str | None = None,
    base_env: Mapping[str, str] | None = None,
    threads: str = "auto",
) -> Launch:
    """The node's long-lived worker (:mod:`fedtune.node.worker`) on ``socket``.

    It runs as the user who starts ``fedtune deploy supernode`` (the owner of the
    node's data, secret context and state directory); with ``runtime_user`` its
    socket is handed to that user, who runs the SuperNode. ``threads``: its share of
    the cores, ``"auto"`` or a count (:mod:`fedtune.node.cores`).
    """
    if threads != "auto":
        threads_for(threads, cores=1)  # refuse a bad count before anything starts
    state = secret_dir(Path(str(config["state-dir"])), "--state-dir")
    argv = [
        sys.executable,
        "-m",
        "fedtune.node.worker",
        f"--socket={socket}",
        f"--node-config={json.dumps(dict(config))}",
    ]
    if runtime_user:
        argv.append(f"--socket-owner={runtime_user}")
    env = _environment(state / "worker-home", base_env)
    env.pop("FLWR_HOME")  # the worker runs no Flower process
    env[CORES_ENV] = threads
    if threads != "auto":
        env["OMP_NUM_THREADS"] = threads
    return Launch(argv, env)


def supernode(
    *,
    superlink_address: str,
    ca: Path,
    key: Path,
    port: int,
    config: Mapping[str, object],
    host: str = "127.0.0.1",
    home: Path | None = None,
    base_env: Mapping[str, str] | None = None,
    program: str = "flower-supernode",
) -> Launch:
    """``flower-supernode`` dialling the SuperLink over TLS with its authentication key.

    ``config`` is its node config (what its ClientApps see); ``home`` its FLWR_HOME
    (default ``STATE_DIR/flwr-home`` for a config with a ``state-dir``); ``program`` the
    script to run (``fedtune deploy supernode`` passes the copy that shortens Flower's
    idle waits, :mod:`fedtune.deploy.supernode_waits`). Its SuperExec looks for tasks
    every :data:`~fedtune.deploy.supernode_waits.SUPEREXEC_POLL_SECONDS` s (Flower: 1 s).
    """
    ca = _file(ca, "the CA certificate", "--ca")
    key = _file(key, "this node's private key", "--key")
    _port(port, "--port")
    if home is None:
        home = secret_dir(Path(str(config["state-dir"])), "--state-dir") / "flwr-home"
    home.mkdir(exist_ok=True, mode=0o700)
    pairs = " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())
    argv = [
        program,
        f"--superlink={_address(superlink_address)}",
        f"--root-certificates={ca}",
        f"--auth-supernode-private-key={key}",
        f"--host={host}",
        f"--port={port}",
        f"--node-config={pairs}",
    ]
    env = _environment(home, base_env)
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
    return Launch(argv, env)


def write_connection(home: Path, *, superlink_address: str, ca: Path) -> Path:
    """Write the ``flwr`` CLI's connection config (``FLWR_HOME/config.toml``)."""
    ca = _file(ca, "the CA certificate", "--ca")
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f"address = {_toml_value(_address(superlink_address))}\n"
        f"root-certificates = {_toml_value(str(ca))}\n"
    )
    return path


def flwr_cli(home: Path, *args: str, base_env: Mapping[str, str] | None = None) -> Launch:
    """A ``flwr`` CLI call against the connection written by :func:`write_connection`."""
    home = Path(home).expanduser().resolve()
    return Launch(["flwr", *args], _environment(home, base_env))


#: The operator's record of registered nodes, beside the flwr CLI's config in ``--home``.
NODES_FILE = "nodes.toml"


def record_node(home: Path, *, node_id: int, name: str, max_examples: int | None) -> Path:
    """Note a registered node (and the example count it may claim) in ``HOME/nodes.toml``.

    ``fedtune deploy run`` passes the limits to the server as the ``node-limits``
    wiring key; a node registered without ``--max-examples`` is held to the run's
    ``max-client-examples``. Re-registering a name replaces its entry.
    """
    path = Path(home).expanduser().resolve() / NODES_FILE
    nodes = tomllib.loads(path.read_text())["nodes"] if path.is_file() else {}
    nodes = {k: v for k, v in nodes.items() if v.get("name") != name}
    entry: dict[str, object] = {"name": name}
    if max_examples is not None:
        entry["max-examples"] = max_examples
    nodes[str(node_id)] = entry
    text = "".join(
        f'[nodes."{node}"]\n' + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
        for node, values in sorted(nodes.items())
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o644)
    return path


def node_limits(home: Path) -> dict[int, int]:
    """``node id -> max-examples`` of the nodes registered with a limit (empty if none)."""
    path = Path(home).expanduser().resolve() / NODES_FILE
    if not path.is_file():
        return {}
    try:
        nodes = tomllib.loads(path.read_text()).get("nodes", {})
        return {
            parse_decimal(node, key="node id"): int(values["max-examples"])
            for node, values in nodes.items()
            if "max-examples" in values
        }
    except (tomllib.TOMLDecodeError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"{str(path)!r} is not a fedtune node list: {err}") from None
