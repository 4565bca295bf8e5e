"""The node-local channel: the thin ClientApp forwards each message to the node's worker.

A gRPC call on a Unix socket in the node's runtime directory (mode 0600, owned by the
OS user the SuperNode runs as): the request streamed in chunks of :data:`CHUNK_BYTES`
(``HandleStream``; gRPC holds a unary message three times over while it receives it,
a stream only one chunk), the reply in one message. Both request and reply are
Flower's own record bytes (a serialised ``flwr.proto.recorddict_pb2.RecordDict``):
the request is the server message's content plus two records of the ClientApp's own,

* ``fedtune.request`` (ConfigRecord): ``message-type`` and ``run-id``;
* ``fedtune.run-config`` (ConfigRecord): the run config the server sent,

and the reply is the content of the reply message. Readiness is the standard gRPC
health-checking service (``grpc.health.v1``), serving :data:`SERVICE` once the worker
has imported torch and can take a message. This module imports no torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtune.errors import WorkerError, WorkerUnavailable
from fedtune.node.codes import known_code

__all__ = [
    "DEFAULT_MAX_ADAPTER_PARAMS",
    "CHUNK_BYTES",
    "HANDLE",
    "HANDLE_STREAM",
    "MAX_MESSAGE_BYTES",
    "REQUEST",
    "OwnedBytes",
    "RUN_CONFIG",
    "SERVICE",
    "decode",
    "encode",
    "forward",
    "max_request_bytes",
    "wait_ready",
]

#: The worker's gRPC service and its one method.
SERVICE = "fedtune.node.v1.NodeWorker"
HANDLE = f"/{SERVICE}/Handle"
HANDLE_STREAM = f"/{SERVICE}/HandleStream"

#: One message of a streamed request; the worker's gRPC receive limit is this plus
#: :data:`RECORD_SLACK_BYTES` (a unary ``Handle`` request is held to it too).
CHUNK_BYTES = 1 << 20

#: Wire bytes per adapter parameter of the largest honest message, a global sum: 15.93
#: for the CKKS aggregate (``benchmarks/bench_crypto.py``), 8 for a float64 plaintext
#: one; 32 leaves twice the CKKS figure.
WIRE_BYTES_PER_PARAM = 32
#: Room for everything beside the payload: the run config, metadata, record framing.
RECORD_SLACK_BYTES = 1 << 20
#: The largest adapter a worker accepts messages for unless its operator says otherwise
#: (``--max-adapter-params``): LoRA r = 16 on the query and value projections of a
#: 7B Llama is 8.4M (2 x 32 layers x 16 x (4096 + 4096)).
DEFAULT_MAX_ADAPTER_PARAMS = 1 << 23


def max_request_bytes(max_adapter_params: int = DEFAULT_MAX_ADAPTER_PARAMS) -> int:
    """The largest honest request (or reply) for an adapter of ``max_adapter_params``.

    ``max_adapter_params x WIRE_BYTES_PER_PARAM + RECORD_SLACK_BYTES``: the global sum
    of that adapter with twice the measured CKKS overhead, plus the records around it.
    The worker's gRPC receive limit: a larger request is refused by gRPC before the
    worker holds it (``RESOURCE_EXHAUSTED``).
    """
    if max_adapter_params < 1:
        raise ValueError(f"max-adapter-params must be >= 1, got {max_adapter_params}.")
    return max_adapter_params * WIRE_BYTES_PER_PARAM + RECORD_SLACK_BYTES


#: The largest request or reply by default (269 MB; Flower's own limit is 512 MiB).
MAX_MESSAGE_BYTES = max_request_bytes()

#: Record names the ClientApp adds to the server's content (the worker removes them).
REQUEST = "fedtune.request"
RUN_CONFIG = "fedtune.run-config"

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def encode(content: RecordDict) -> bytes:
    """A ``RecordDict`` as Flower's record bytes."""
    return bytes(recorddict_to_proto(content).SerializeToString())


class OwnedBytes:
    """Request bytes handed over once (the worker's gRPC request deserializer).

    gRPC keeps the argument of a handler alive until the handler returns; wrapped,
    the bytes can be taken out and freed as soon as they are parsed, so a request
    is not held three times over (bytes, protobuf, records) while it is decoded.
    """

    __slots__ = ("_data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = data

    def take(self) -> bytes | bytearray:
        """The bytes; the wrapper then holds nothing."""
        data, self._data = self._data, b""
        return data


def decode(data: bytes | bytearray | OwnedBytes) -> RecordDict:
    """Flower's record bytes as a ``RecordDict`` (``ValueError`` if they are not).

    With :class:`OwnedBytes` the bytes are released once parsed, before the records
    are built: the peak is the protobuf and the records, not the bytes too.
    """
    proto = ProtoRecordDict()
    raw = data.take() if isinstance(data, OwnedBytes) else data
    try:
        proto.ParseFromString(raw)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise ValueError(f"not a Flower RecordDict: {err}") from None
    del raw  # with OwnedBytes the last reference: freed before the records are made
    try:
        return recorddict_from_proto(proto)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"not a Flower RecordDict: {err}") from None


def request(
    message_type: str, content: RecordDict, *, run_id: int, run_config: Mapping[str, object]
) -> bytes:
    """The request bytes for one server message."""
    records = dict(content.items())
    records[REQUEST] = ConfigRecord({"message-type": message_type, "run-id": str(run_id)})
    records[RUN_CONFIG] = ConfigRecord(dict(run_config))  # type: ignore[arg-type]
    return encode(RecordDict(records))  # type: ignore[arg-type]


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of at most ``size`` bytes (a streamed request's messages)."""
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


def socket_target(address: str) -> str:
    """``unix:/abs/path`` for a socket path (or an address that already says ``unix:``)."""
    return address if address.startswith("unix:") else f"unix:{address}"


def forward(
    address: str,
    message_type: str,
    content: RecordDict,
    *,
    run_id: int,
    run_config: Mapping[str, object],
    timeout: float | None = None,
) -> RecordDict:
    """Send one server message to the worker at ``address``; its reply content.

    Raises :class:`WorkerUnavailable` when nothing answers on the socket (the worker
    is down or restarting) and :class:`WorkerError` with the worker's fixed code when
    it refused or failed the message.
    """
    target = socket_target(address)
    data = request(message_type, content, run_id=run_id, run_config=run_config)
    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        call = channel.stream_unary(HANDLE_STREAM)
        try:
            reply = call(chunks(data), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise WorkerUnavailable(
                    f"cannot reach this node's fedtune worker at {target} ({details}); "
                    "the node sits out this round. Is `fedtune deploy supernode` running, "
                    "and did its worker start (see its log)?"
                ) from None
            raise WorkerError(known_code(details)) from None
    return decode(reply)


#: A socket file missing this long means no worker is coming (a restarting worker's
#: stale socket stays until the new one replaces it).
GONE_SECONDS = 3.0


def wait_ready(address: str, *, timeout: float) -> bool:
    """Whether the worker's health service reports SERVING within ``timeout`` seconds.

    Gives up early when the socket file is missing for :data:`GONE_SECONDS`: the worker
    was stopped (it removes its socket), not restarted.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    path = Path(socket_target(address).removeprefix("unix:"))
    start = time.monotonic()
    deadline = start + timeout
    missing_since: float | None = None
    with grpc.insecure_channel(socket_target(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if path.exists():
                missing_since = None
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                except grpc.RpcError:
                    pass
            else:
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since >= GONE_SECONDS:
                    return False
            time.sleep(0.2)
    return False
