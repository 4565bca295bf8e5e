"""``fedtune deploy``: make certificates and keys, start each role, submit a run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune import procs
from fedtune.config import collect_overrides
from fedtune.config.reference import KeysHelpFormatter, keys_epilog
from fedtune.deploy import pki, roles, submit
from fedtune.deploy.pki import MAX_DAYS
from fedtune.deploy.priority import SUPERLINK_NICE, SUPERNODE_NICE, check_nice
from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.deploy.roles import Launch

DESCRIPTION = """\
A real federation on Flower's deployment engine: one SuperLink (the server), one
SuperNode per data owner, and `flwr run` to submit. TLS and SuperNode
authentication are always on, runtime dependency installation is off, each
process gets FLWR_HOME inside its own state directory, and the SuperLink's
Control API listens on 127.0.0.1 only (nodes reach a Fleet-only port).

  key holder       fedtune keygen --out ckks     (secret.ctx to every node; ONLY public.ctx
                                                  goes to the server machine)
  operator         fedtune deploy certs --out certs --ca-dir ca-offline --host SERVER_ADDRESS
                       (copy certs/ to the server; keep ca-offline/ off it)
  server machine   fedtune deploy superlink --certs certs --state-dir server-state \\
                       --fleet-host 0.0.0.0 --fleet-port 9092
  each node        fedtune deploy node-key --out node-key NAME     (send NAME.pub to the operator)
  operator         fedtune deploy register --superlink 127.0.0.1:9093 --ca certs/ca.crt \\
                       --home op NAME.pub          (on the server, or through ssh -L 9093:...)
  each node        fedtune deploy supernode --superlink SERVER_ADDRESS:9092 --ca ca.crt \\
                       --key node-key/NAME --state-dir state --data-path my.csv \\
                       --secret-context secret.ctx --port 9094
  operator         fedtune deploy run FILE.toml --superlink 127.0.0.1:9093 --ca certs/ca.crt \\
                       --home op --run-dir /srv/fedtune/run1 --public-context public.ctx [--resume]
  each node        fedtune export state --key secret.ctx          (the final PEFT adapter)

With encryption-backend = "ckks-multiparty" there is no keygen, no --secret-context and
no --public-context: the ServerApp runs the key ceremony over the nodes before round 1
(each node keeps its own key in --state-dir; docs/deployment.md, "Multiparty keys").
"""


def _connection(p: argparse.ArgumentParser, *, home: bool = True) -> None:
    p.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address"
    )
    p.add_argument("--ca", required=True, type=Path, help="the deployment's CA certificate")
    if home:
        p.add_argument(
            "--home",
            required=True,
            type=Path,
            metavar="DIR",
            help="FLWR_HOME of the flwr CLI (its connection config is written there)",
        )


def add_parser(sub: Any) -> None:
    """Register ``fedtune deploy`` and its subcommands."""
    dep = sub.add_parser(
        "deploy",
        help="run a real federation: certificates, node keys, SuperLink, SuperNodes, flwr run",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    roles = dep.add_subparsers(dest="role", metavar="ROLE", required=True)

    certs = roles.add_parser(
        "certs",
        help="a CA and the SuperLink's TLS certificate",
        description="Write CA_DIR/ca.key and ca.crt (the CA: keep CA_DIR offline, never on "
        "the SuperLink) and OUT/ca.crt, server.pem, server.key (copy OUT to the SuperLink). "
        "Private keys are mode 0600, certificates 0644, both directories 0700. Give ca.crt "
        "to every node and operator. 127.0.0.1 is always in the server certificate (the "
        "SuperLink's Control API listens there).",
    )
    certs.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="the SuperLink's certificates"
    )
    certs.add_argument(
        "--ca-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="the CA's private key and certificate (keep it offline)",
    )
    certs.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="ADDRESS",
        help="an IP address or DNS name nodes use to reach the SuperLink (repeatable; "
        "no wildcards; default: 127.0.0.1 and localhost)",
    )
    certs.add_argument(
        "--days",
        type=int,
        default=365,
        help=f"validity in days (default 365, at most {MAX_DAYS}); renew by running certs again",
    )

    nk = roles.add_parser(
        "node-key",
        help="a SuperNode authentication key pair",
        description="Write OUT/NAME (private, mode 0600, stays on the node) and OUT/NAME.pub "
        "(register it with `fedtune deploy register`). ECDSA P-384, OpenSSH format.",
    )
    nk.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory for the key files (made mode 0700 if new)",
    )
    nk.add_argument("names", nargs="+", metavar="NAME", help="one key pair per name (e.g. node-0)")

    sl = roles.add_parser(
        "superlink",
        help="start the SuperLink (TLS, node authentication, no runtime installs)",
        description="Run flower-superlink in the foreground with TLS from --certs, SuperNode "
        "authentication, runtime dependency installation off, its database and FLWR_HOME in "
        "--state-dir (registrations and runs survive a restart). Flower serves its Control "
        "API (register nodes, submit runs; no authentication in open-source Flower) on the "
        "same listener as the Fleet API, so the SuperLink listens on 127.0.0.1:CONTROL_PORT "
        "only and a Fleet-only gateway on FLEET_HOST:FLEET_PORT faces the nodes. Refuses to "
        "start if a CKKS secret context or the CA private key is in --certs or --state-dir.",
    )
    sl.add_argument("--certs", required=True, type=Path, metavar="DIR", help="from `certs --out`")
    sl.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="the SuperLink's database and FLWR_HOME; reuse it to keep registrations and "
        "to resume after a restart",
    )
    sl.add_argument(
        "--fleet-host",
        default="127.0.0.1",
        help="node-facing address of the Fleet API (default 127.0.0.1; 0.0.0.0 for all)",
    )
    sl.add_argument(
        "--fleet-port", type=int, default=9092, help="node-facing Fleet API port (default 9092)"
    )
    sl.add_argument(
        "--control-port",
        type=int,
        default=9093,
        help="the SuperLink's own port on 127.0.0.1: Control API for `flwr` (default 9093)",
    )
    sl.add_argument(
        "--nice",
        type=int,
        default=SUPERLINK_NICE,
        metavar="N",
        help=f"start the SuperLink, its gateway and the ServerApps N steps nicer (default "
        f"{SUPERLINK_NICE}; 0: as this command), so that on a machine shared with nodes "
        "their polls yield to the training",
    )

    reg = roles.add_parser(
        "register",
        help="register SuperNode public keys with the SuperLink",
        description="Run `flwr supernode register` for each key. Only registered nodes "
        "can connect.",
    )
    _connection(reg)
    reg.add_argument(
        "keys",
        nargs="+",
        type=Path,
        metavar="NAME.pub",
        help="public keys from `fedtune deploy node-key` (one per node)",
    )
    reg.add_argument(
        "--max-examples",
        type=int,
        metavar="N",
        help="the most examples these nodes may claim per round (their FedAvg weight); "
        "the server drops a reply above it. Default: the run's `max-client-examples`",
    )

    sn = roles.add_parser(
        "supernode",
        help="start this node: its worker (data, state, keys, budget) and its SuperNode",
        description="Run the node in the foreground: a long-lived worker that holds the "
        "model, this node's data, state directory (privacy ledger, last global state), CKKS "
        "secret context and privacy budget (the server never chooses them), and "
        "flower-supernode, whose ClientApps forward each message to the worker over a Unix "
        "socket (mode 0600). A worker that dies is restarted. With --runtime-user (as root) "
        "the SuperNode and every ClientApp run as that user, who cannot read the node's "
        "files (checked before start).",
    )
    _connection(sn, home=False)
    sn.add_argument("--key", required=True, type=Path, help="this node's private key")
    sn.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="this node's own state: privacy ledger, run nonces, last global sum "
        "(`fedtune export` and `fedtune audit` read it)",
    )
    sn.add_argument("--port", type=int, required=True, help="the node's local runtime port")
    sn.add_argument("--host", default="127.0.0.1", help="address of the local runtime API")
    sn.add_argument("--data-path", type=Path, help="this node's own CSV / JSONL / dataset dir")
    sn.add_argument("--secret-context", type=Path, help="secret.ctx from `fedtune keygen`")
    sn.add_argument("--name", default="", help="the name in metrics and ledgers")
    sn.add_argument(
        "--nice",
        type=int,
        default=SUPERNODE_NICE,
        metavar="N",
        help=f"start Flower's SuperNode and the ClientApps N steps nicer than the worker "
        f"(default {SUPERNODE_NICE}; 0: the same), so that their polls yield to training",
    )
    sn.add_argument(
        "--threads",
        default="auto",
        metavar="N|auto",
        help="torch threads of this node's worker: `auto` (default) uses every core, and "
        "the nodes this user runs on one machine take turns, one message's work at a time; "
        "or a fixed count, with no turns",
    )
    policy = sn.add_argument_group(
        "privacy policy",
        "This node's own policy, kept in STATE_DIR/policy.toml (these flags override the "
        "file and are written back to it). A run config asking for anything else is refused "
        "before training, one line naming the key, the server's value and the node's. "
        "Defaults: δ 1e-5, ε budget 8, test-fraction 0.2, max-seq-length 48, DP evaluation, "
        "the bundled model only.",
    )
    policy.add_argument("--epsilon-budget", type=float, help="the ε this node will not exceed")
    policy.add_argument(
        "--delta",
        type=float,
        help="this node's δ (ledger, budget, σ calibration, audit); below 1 / n_k",
    )
    policy.add_argument("--test-fraction", type=float, help="this node's held-out fraction")
    policy.add_argument("--max-seq-length", type=int, help="the token limit this node trains with")
    policy.add_argument(
        "--evaluation",
        choices=("dp", "exact"),
        help="held-out replies as DP releases (dp) or exact metrics (exact)",
    )
    policy.add_argument("--eval-noise-multiplier", type=float, help="σ of a DP evaluation release")
    policy.add_argument(
        "--max-step-slack",
        type=float,
        help="factor on the movement bound a decrypted global must keep (fedtune.movement)",
    )
    policy.add_argument(
        "--model",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a base model this node will load (repeatable): pinned by the SHA-256 of its "
        "files now; a run's `model-path` must be one of these or empty (the bundled model)",
    )
    policy.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="PUBFILE|any",
        help="another data owner's node public key (their `node-key` NAME.pub, exchanged out "
        "of band; repeatable): a multiparty key ceremony's roster may hold only these and "
        "this node. Without any, the node refuses the ceremony; `--peer any` trusts the "
        "server's roster (it can add members of its own)",
    )
    sn.add_argument("--partition-id", type=int, help="with a shared data set: this partition")
    sn.add_argument("--num-partitions", type=int, help="with a shared data set: how many")
    sn.add_argument(
        "--runtime-user",
        metavar="USER",
        help="run the SuperNode and its ClientApps as USER (needs root; USER must not be "
        "able to read the data, the secret context or --state-dir)",
    )
    sn.add_argument(
        "--worker-user",
        metavar="USER",
        help="run the node worker as USER (needs root; it binds the socket as root, then "
        "drops to USER, who must own --state-dir and read the data and the secret context)",
    )
    sn.add_argument(
        "--runtime-dir",
        type=Path,
        metavar="DIR",
        help="the SuperNode's own directory (FLWR_HOME, the worker's socket); default "
        "STATE_DIR/runtime, required with --runtime-user (outside --state-dir)",
    )

    run = roles.add_parser(
        "run",
        help="submit a run with `flwr run` and wait for its outcome",
        description="Check the config, submit this Flower App with `flwr run`, stream its "
        "log and exit 0 only if the run completed. The server writes --run-dir "
        "(metrics.jsonl, checkpoint/) on the SuperLink's machine.",
        formatter_class=KeysHelpFormatter,
        epilog=keys_epilog(),
    )
    run.add_argument("config", nargs="?", type=Path, help="a TOML file of config keys")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set num-rounds=3",
    )
    _connection(run)
    run.add_argument("--run-dir", required=True, type=Path, help="the server's run directory")
    run.add_argument("--run-id", default="", help="ledger run id (default: run-dir's name)")
    run.add_argument("--public-context", type=Path, help="public.ctx (encrypted runs)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run directory's last checkpoint",
    )
    run.add_argument("--quiet", action="store_true", help="do not stream the run's log")


def _supervise_pair(first: Launch, second: Launch) -> int:
    """Run two children until either ends (or SIGTERM / SIGINT), then stop the other."""
    children = []
    for launch in (first, second):
        name = launch.argv[2] if launch.argv[0] == sys.executable else launch.argv[0]
        print(f"fedtune deploy: starting {name}", file=sys.stderr, flush=True)
        children.append(subprocess.Popen(launch.argv, env=launch.env, **launch.popen_kwargs()))
    relay = procs.StopRelay(children)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        procs.end_children(children)
    codes = [child.returncode for child in children]
    if relay.stopping:
        return 0
    return next((c for c in codes if c != 0), 0) or 1


def _register(args: argparse.Namespace) -> int:
    """``flwr supernode register`` each key; note its node id and limit in ``nodes.toml``."""
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max-examples must be >= 1, got {args.max_examples}.")
    status = 0
    for key in args.keys:
        if not key.is_file():
            raise ConfigError(f"public key {str(key)!r} does not exist.")
        name = key.name.removesuffix(".pub")
        launch = roles.flwr_cli(
            args.home,
            "supernode",
            "register",
            str(key.resolve()),
            roles.CONNECTION,
            "--name",
            name,
            "--format",
            "json",
        )
        done = subprocess.run(
            launch.argv, env=launch.env, check=False, capture_output=True, text=True
        )
        try:
            reply = json.loads(done.stdout)
            node_id = int(reply["node-id"]) if reply.get("success") else None
        except (ValueError, KeyError, TypeError, AttributeError):
            reply, node_id = {}, None
        if node_id is None:
            why = reply.get("error-message") if isinstance(reply, dict) else None
            print(
                f"fedtune deploy register: error: {name}: "
                f"{why or (done.stdout + done.stderr).strip()[-1000:]}",
                file=sys.stderr,
            )
            status = status or done.returncode or 1
            continue
        path = roles.record_node(
            args.home, node_id=node_id, name=name, max_examples=args.max_examples
        )
        limit = (
            f"at most {args.max_examples} examples per round"
            if args.max_examples is not None
            else "the run's `max-client-examples`"
        )
        print(f"registered {name} as node {node_id} ({limit}; noted in {path})")
    return status


def run(args: argparse.Namespace) -> int:
    """Carry out ``fedtune deploy ROLE``."""
    if args.role == "certs":
        files = pki.make_tls(
            args.out,
            ca_dir=args.ca_dir,
            hosts=args.hosts or ["127.0.0.1", "localhost"],
            days=args.days,
        )
        print(f"CA certificate (every node and operator): {files.ca_cert}")
        print(f"CA private key (keep offline, never on the SuperLink): {files.ca_key}")
        print(
            f"SuperLink directory (copy to the server): {files.server_ca_cert.parent} "
            f"({files.server_cert.name}, {files.server_key.name}, {files.server_ca_cert.name})"
        )
        return 0
    if args.role == "node-key":
        for name in args.names:
            key = pki.make_node_key(args.out, name)
            print(f"{name}: private {key.private} (stays on the node), public {key.public}")
        return 0
    if args.role == "superlink":
        nice = check_nice(args.nice)
        link = roles.superlink(
            certs=args.certs, state_dir=args.state_dir, control_port=args.control_port
        )
        gateway = roles.fleet_gateway(
            certs=args.certs,
            host=args.fleet_host,
            port=args.fleet_port,
            control_port=args.control_port,
        )
        return _supervise_pair(replace(link, nice=nice), replace(gateway, nice=nice))
    if args.role == "supernode":
        check_nice(args.nice)
        config = roles.node_config(
            state_dir=args.state_dir,
            data_path=args.data_path,
            secret_context=args.secret_context,
            name=args.name,
            epsilon_budget=args.epsilon_budget,
            partition_id=args.partition_id,
            num_partitions=args.num_partitions,
        )
        from fedtune.deploy.node import policy_settings, start_node  # torch, the model

        config.update(policy_settings(args))
        return start_node(args, config)
    roles.write_connection(args.home, superlink_address=args.superlink, ca=args.ca)
    if args.role == "register":
        return _register(args)
    # run
    config = submit.run_config(
        collect_overrides(args.config, args.overrides),
        run_dir=args.run_dir,
        run_id=args.run_id,
        public_context=args.public_context,
        resume=args.resume,
        node_limits=roles.node_limits(args.home),
    )
    outcome = submit.submit_run(args.home, config, stream=not args.quiet)
    if outcome.ok:
        print(f"run {outcome.run_id} completed; server run directory: {config['run-dir']}")
        return 0
    print(
        f"fedtune deploy run: run {outcome.run_id} ended {outcome.status}: {outcome.details}",
        file=sys.stderr,
    )
    return 1
