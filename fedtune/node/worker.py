"""The node worker: one long-lived process per node that does the node's rounds.

Flower 1.41 runs every message in a fresh ``flwr-clientapp`` process, which would
re-import torch, re-read the data and rebuild the model twice a round. The worker
holds all of that instead (torch, the model with its adapter, the tokenised data,
the CKKS secret context, the ledger) and answers the thin ClientApp
(``fedtune/apps/client/app.py``) over a gRPC Unix socket (:mod:`fedtune.node.channel`).

It is also the node's security boundary. ``fedtune deploy supernode`` starts it as
the user who owns the node's files, and the SuperNode (with every ClientApp it
starts, whatever app the SuperLink sent) as another user, who can reach the socket
and nothing else. The socket is mode 0600 and owned by that runtime user; the
worker's one method does a round's train or evaluate message and nothing more, with
the node's own settings (data, state directory, secret context, budget) fixed on the
worker's command line, never taken from a message.

What the node keeps is on disk before a reply leaves (:mod:`fedtune.train.runtime`
appends the ledger and stores the reply first; the last global sum is checkpointed
before training), so a worker killed mid-round loses nothing and counts nothing
twice; ``fedtune deploy supernode`` restarts it.

    python -m fedtune.node.worker --socket PATH --node-config JSON
        [--socket-owner USER] [--user USER]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtune.ids import parse_decimal
from fedtune.node import cores
from fedtune.node.channel import (
    CHUNK_BYTES,
    DEFAULT_MAX_ADAPTER_PARAMS,
    RECORD_SLACK_BYTES,
    REQUEST,
    RUN_CONFIG,
    SERVICE,
    OwnedBytes,
    decode,
    encode,
    max_request_bytes,
)
from fedtune.node.codes import code_of

__all__ = ["NodeWorker", "main", "make_server", "serve"]

log = logging.getLogger("fedtune.node")


class NodeWorker:
    """The worker's one method: a server message's content in, its reply content out.

    Messages are handled one at a time (the node has one model); the health service
    answers meanwhile.
    """

    def __init__(
        self,
        node_config: Mapping[str, object],
        *,
        max_request_bytes: int = max_request_bytes(DEFAULT_MAX_ADAPTER_PARAMS),
    ) -> None:
        self.node_config = dict(node_config)
        self.max_request_bytes = max_request_bytes
        self._lock = threading.Lock()
        self.handled = 0

    def busy(self) -> bool:
        """Whether a message is being handled right now."""
        return self._lock.locked()

    def handle(self, data: bytes | OwnedBytes, context: grpc.ServicerContext) -> bytes:
        """gRPC entry point (unary, a request of at most one chunk): see :meth:`_run`.

        A request is decoded only once it holds the lock: requests that wait hold
        their bytes, never a decoded copy too.
        """
        with self._lock:
            return self._run(data, context)

    def handle_stream(self, parts: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """gRPC entry point for a request streamed in chunks (what the ClientApp sends).

        The chunks are read under the lock into one buffer, at most
        ``max_request_bytes`` in all (``RESOURCE_EXHAUSTED`` past it, before more is
        read); the buffer is freed once parsed.
        """
        with self._lock:
            buffer = bytearray()
            for part in parts:
                if len(buffer) + len(part) > self.max_request_bytes:
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"request larger than {self.max_request_bytes} bytes, the largest "
                        "this node's adapter needs (`--max-adapter-params`).",
                    )
                buffer += part
            request = OwnedBytes(buffer)
            del buffer  # the request's only holder now: freed once parsed
            return self._run(request, context)

    def _run(self, data: bytes | OwnedBytes, context: grpc.ServicerContext) -> bytes:
        """Decode, do the round's work, encode; under the lock.

        A refusal or failure aborts the call with one fixed code
        (:data:`fedtune.node.codes.CODES`) as its details: the text, which may hold
        values, goes to this worker's log only.
        """
        from fedtune.node import round as node_round  # loaded by serve() once bound

        try:
            content = decode(data)
            message_type, run_id, run_config = _unwrap(content)
        except ValueError as err:
            log.warning("bad request: %s", err)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad-request")
        start = time.perf_counter()
        server_round = _round_of(content)
        log.info("round %s: %s message (run %s)", server_round, message_type, run_id)
        try:
            with cores.turn(  # co-located nodes take turns (fedtune.node.cores)
                on_wait=lambda: log.info(
                    "round %s: waiting for this machine's turn (another node of this user "
                    "is working)",
                    server_round,
                )
            ) as waited:
                if waited >= 0.1:
                    log.info("round %s: this machine's turn after %.1f s", server_round, waited)
                reply = node_round.handle(
                    message_type,
                    content,
                    run_config=run_config,
                    node_config=self.node_config,
                    run_id=run_id,
                    deployed=True,
                )
        except Exception as err:  # noqa: BLE001 - a fixed code leaves; the worker lives on
            code = code_of(err)
            log.warning(
                "round %s: %s refused (%s): %s",
                server_round,
                message_type,
                code,
                err,
                exc_info=code == "node-error",
            )
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, code)
        self.handled += 1
        log.info(
            "round %s: %s reply after %.1f s",
            server_round,
            message_type,
            time.perf_counter() - start,
        )
        return encode(reply)


def _unwrap(content: Any) -> tuple[str, int, dict[str, object]]:
    """Remove the ClientApp's two records from ``content``; check and return them."""
    if REQUEST not in content.config_records or RUN_CONFIG not in content.config_records:
        raise ValueError(f"the request needs the {REQUEST!r} and {RUN_CONFIG!r} records.")
    meta = content.config_records.pop(REQUEST)
    run_config = dict(content.config_records.pop(RUN_CONFIG))
    message_type = meta.get("message-type")
    if message_type not in ("train", "evaluate"):
        raise ValueError(f"message-type must be 'train' or 'evaluate', got {message_type!r}.")
    run_id = parse_decimal(meta.get("run-id"), key="run-id")  # ASCII digits: '١٢٣' is no id
    return message_type, run_id, run_config


def _round_of(content: Any) -> object:
    try:
        return content.config_records["config"]["server-round"]
    except (KeyError, TypeError):
        return "?"


def _bind_socket(server: grpc.Server, path: Path, owner: str | None) -> None:
    """Listen on ``path`` (mode 0600, owned by ``owner`` if given); replace a stale socket.

    ``fedtune deploy supernode`` keeps the socket's directory its own (the runtime user
    can plant nothing there); the socket is still made 0600 by the umask at creation and
    handed over with ``lchown``, so no step follows a link.
    """
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.lstat().st_mode)):
        raise SystemExit(f"fedtune worker: {str(path)!r} exists and is not a socket; refusing.")
    path.unlink(missing_ok=True)
    umask = os.umask(0o177)
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(umask)
    if bound == 0 or not stat.S_ISSOCK(path.lstat().st_mode):
        raise SystemExit(f"fedtune worker: cannot listen on {str(path)!r}.")
    if owner:
        user = pwd.getpwnam(owner)
        os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)


def _drop_to(user_name: str) -> None:
    """Become ``user_name`` (after the socket is bound and handed to its owner)."""
    user = pwd.getpwnam(user_name)
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    os.environ["HOME"] = user.pw_dir


def make_server(
    worker: NodeWorker, *, max_adapter_params: int = DEFAULT_MAX_ADAPTER_PARAMS
) -> tuple[grpc.Server, health.HealthServicer]:
    """The worker's gRPC server (not bound, not started) and its health service.

    Its receive limit is :func:`fedtune.node.channel.max_request_bytes` of
    ``max_adapter_params``: gRPC refuses a larger request (``RESOURCE_EXHAUSTED``)
    before the worker holds it. At most four calls at once (health checks
    included; gRPC refuses a fifth), and one message is decoded and handled at a
    time, so a worker holds at most four requests' bytes and one decoded copy.
    """
    limit = max_request_bytes(max_adapter_params)
    worker.max_request_bytes = limit
    options = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", CHUNK_BYTES + RECORD_SLACK_BYTES),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=options, maximum_concurrent_rpcs=4
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Handle": grpc.unary_unary_rpc_method_handler(
                worker.handle, request_deserializer=OwnedBytes
            ),
            "HandleStream": grpc.stream_unary_rpc_method_handler(worker.handle_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health_servicer


def serve(
    node_config: Mapping[str, object],
    socket_path: Path,
    *,
    socket_owner: str | None = None,
    user: str | None = None,
    max_adapter_params: int = DEFAULT_MAX_ADAPTER_PARAMS,
) -> None:
    """Serve the node's rounds on ``socket_path`` until SIGTERM / SIGINT."""
    os.umask(0o077)  # everything the worker writes (ledger, checkpoint) is its own
    socket_path = Path(socket_path).parent.resolve() / Path(socket_path).name  # no link followed
    worker = NodeWorker(node_config)
    server, health_servicer = make_server(worker, max_adapter_params=max_adapter_params)
    _bind_socket(server, socket_path, socket_owner)
    if user:
        _drop_to(user)
    server.start()
    started = time.perf_counter()
    # What every round needs, loaded once the socket is bound (a SuperNode waits for the
    # socket): torch, transformers, peft, Opacus, TenSEAL.
    import fedtune.node.round  # noqa: F401
    import fedtune.privacy.dpsgd  # noqa: F401
    import fedtune.secure.ckks  # noqa: F401

    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "fedtune worker ready on %s (pid %d, imports %.1f s)",
        socket_path,
        os.getpid(),
        time.perf_counter() - started,
    )
    stopped = threading.Event()

    def stop(_signum: int, _frame: object) -> None:
        stopped.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    stopped.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=2).wait()
    if worker.busy():
        # A message still running: stop now rather than finish it (its reply could not
        # leave anyway). What it wrote is on disk, as after a kill.
        log.warning("fedtune worker stopped during a message; its round drops this node")
        logging.shutdown()
        os._exit(0)
    with contextlib.suppress(OSError):  # after dropping to --user it may not be ours to remove
        socket_path.unlink(missing_ok=True)
    log.info("fedtune worker stopped after %d message(s)", worker.handled)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedtune.node.worker", description=__doc__)
    parser.add_argument("--socket", required=True, type=Path, help="the Unix socket to listen on")
    parser.add_argument(
        "--node-config", required=True, help="the node's own settings (JSON object)"
    )
    parser.add_argument("--socket-owner", help="the OS user the SuperNode runs as")
    parser.add_argument("--user", help="drop to this OS user after binding the socket")
    parser.add_argument(
        "--max-adapter-params",
        type=int,
        default=DEFAULT_MAX_ADAPTER_PARAMS,
        help="the largest adapter (trainable parameters) this node trains; requests "
        "larger than its global sum are refused unread (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.max_adapter_params < 1:
        parser.error(f"--max-adapter-params must be >= 1, got {args.max_adapter_params}.")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s fedtune-worker %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    config = json.loads(args.node_config)
    if not isinstance(config, dict):
        raise SystemExit("--node-config must be a JSON object.")
    serve(
        config,
        args.socket,
        socket_owner=args.socket_owner,
        user=args.user,
        max_adapter_params=args.max_adapter_params,
    )


if __name__ == "__main__":
    main()
