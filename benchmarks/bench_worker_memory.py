"""Peak memory of the node worker per request, as a multiple of the request's size.

Run on demand::

    python benchmarks/bench_worker_memory.py              # 64 MiB request, a few seconds
    python benchmarks/bench_worker_memory.py --mib 256

Starts the worker's gRPC server (:func:`fedtune.node.worker.make_server`, the real
:class:`~fedtune.node.worker.NodeWorker` with its round code replaced by a stub that
returns an empty reply, so no torch is imported) in a child process on a Unix socket,
sends one request whose ``global`` record carries ``--mib`` MiB of payload chunks
(streamed, as :func:`fedtune.node.channel.forward` sends it; unary before that existed),
and reads the child's peak resident memory (``VmHWM``, reset with
``/proc/self/clear_refs`` once the server is up). Printed: the growth of the peak over
the idle server, divided by the request's size.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(socket: str, conn: Any) -> None:
    from flwr.app import RecordDict

    import fedtune.node as node_pkg

    stub = types.ModuleType("fedtune.node.round")
    stub.handle = lambda *a, **k: RecordDict()  # type: ignore[attr-defined]
    sys.modules["fedtune.node.round"] = stub
    node_pkg.round = stub  # type: ignore[attr-defined]

    from fedtune.node import worker

    node_worker = worker.NodeWorker({})
    if hasattr(worker, "make_server"):
        server, _ = worker.make_server(node_worker, max_adapter_params=1 << 24)
    else:  # the code before make_server: serve()'s own setup
        from concurrent import futures

        import grpc

        from fedtune.node.channel import MAX_MESSAGE_BYTES, SERVICE

        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Handle": grpc.unary_unary_rpc_method_handler(node_worker.handle)}
        )
        server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    time.sleep(0.5)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    conn.send(_kib("VmRSS"))
    conn.recv()  # the request was answered
    conn.send(_kib("VmHWM"))
    server.stop(grace=0).wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=64, help="payload size of the request (MiB)")
    args = ap.parse_args()

    import grpc
    from flwr.app import ConfigRecord, RecordDict

    from fedtune.node import channel as node_channel
    from fedtune.node.channel import HANDLE, request

    stream = getattr(node_channel, "HANDLE_STREAM", None)
    chunks = getattr(node_channel, "chunks", None)

    chunk = 1 << 20
    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": 1}),
            "global": ConfigRecord({"chunks": [bytes([i % 251]) * chunk for i in range(args.mib)]}),
        }
    )
    data = request("train", content, run_id=1, run_config={"seed": 1})
    del content
    with tempfile.TemporaryDirectory() as tmp:
        socket = str(Path(tmp) / "w.sock")
        parent, child = mp.Pipe()
        proc = mp.get_context("spawn").Process(target=_child, args=(socket, child))
        proc.start()
        idle = parent.recv()
        with grpc.insecure_channel(
            f"unix:{socket}", options=[("grpc.max_send_message_length", (1 << 31) - 1)]
        ) as channel:
            if stream is not None:  # the ClientApp's way since the request is streamed
                channel.stream_unary(stream)(chunks(data), timeout=120)
            else:
                channel.unary_unary(HANDLE)(data, timeout=120)
        parent.send(True)
        peak = parent.recv()
        proc.join(10)
    size_kib = len(data) / 1024
    print(
        f"request {len(data) / 2**20:.1f} MiB: worker RSS idle {idle / 1024:.1f} MiB, "
        f"peak {peak / 1024:.1f} MiB; peak growth / request size = {(peak - idle) / size_kib:.2f}"
    )


if __name__ == "__main__":
    main()
