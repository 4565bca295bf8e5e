"""The Fleet gateway against peers that never authenticate (issue 27).

Each test starts the gateway on 127.0.0.1 (plain HTTP, an ephemeral port, small
limits) in front of a stub SuperLink (an ``httpx.MockTransport``) and talks to
it with raw sockets, so a test can send half a request head, declare a body it
never sends, or send chunks without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
from base64 import b64encode
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from flwr.supercore.primitives.asymmetric import (
    generate_key_pairs,
    public_key_to_bytes,
    sign_message,
)

from fedtune.config import ConfigError
from fedtune.deploy.gateway import FleetGateway
from fedtune.deploy.gateway_connection import bounded_loop_factory, guarded_protocol
from fedtune.deploy.gateway_limits import GatewayLimits, honest_max_body, signed_key

PUSH = "/v1/fleet/push-messages"
SMALL = GatewayLimits(
    max_body=64 * 1024,
    max_unproven_body=1024,
    max_unproven_requests=2,
    max_requests_per_key=2,
    max_inflight_bytes=128 * 1024,
    max_connections=8,
    header_timeout=0.5,
    body_idle_timeout=0.5,
    request_timeout=5.0,
    unproven_timeout=1.0,
)
#: How long a test waits for the gateway to answer or close before calling it stuck.
PATIENCE = 3.0

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class Node:
    """A SuperNode's signing key, as Flower's ``NodeAuthHttpInterceptor`` uses it."""

    def __init__(self) -> None:
        self.private, public = generate_key_pairs()
        self.public = public_key_to_bytes(public)

    def headers(self, *, at: datetime.datetime | None = None) -> dict[str, str]:
        stamp = (at or datetime.datetime.now(datetime.UTC)).isoformat()
        return {
            "flwr-public-key": b64encode(self.public).decode(),
            "flwr-timestamp": stamp,
            "flwr-signature": b64encode(sign_message(self.private, stamp.encode())).decode(),
        }


class Upstream:
    """A stub SuperLink that reads each body fully and records what it got."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[int] = []
        self.first_chunk = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        size = 0
        async for chunk in request.stream:  # type: ignore[union-attr]
            size += len(chunk)
            self.first_chunk.set()
        self.bodies.append(size)
        return httpx.Response(self.status, content=b"ok")


@contextlib.asynccontextmanager
async def serve(
    upstream: Upstream,
    limits: GatewayLimits = SMALL,
    *,
    url: str = "",
    tls: tuple[Path, Path] | None = None,
) -> AsyncIterator[tuple[int, FleetGateway]]:
    """The gateway with ``limits`` on 127.0.0.1:<ephemeral>, stopped on exit.

    It forwards to ``upstream`` in process, or with ``url`` to a real server;
    ``tls`` is ``(server.pem, server.key)``.
    """
    import uvicorn

    app = FleetGateway(
        url or "http://superlink",
        httpx.AsyncClient
        if url
        else (lambda: httpx.AsyncClient(transport=httpx.MockTransport(upstream))),
        limits=limits,
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=guarded_protocol(limits),
        lifespan="on",
        log_level="critical",
        access_log=False,
        timeout_keep_alive=1,
        ssl_certfile=None if tls is None else str(tls[0]),
        ssl_keyfile=None if tls is None else str(tls[1]),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port, app
    finally:
        server.should_exit = True
        server.force_exit = True
        await asyncio.wait_for(task, 10)


def head(node: Node | None, *, length: int | None, path: str = PUSH, extra: str = "") -> bytes:
    """A request head; ``length=None`` declares a chunked body."""
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", "Content-Type: application/protobuf"]
    if node is not None:
        lines += [f"{k}: {v}" for k, v in node.headers().items()]
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def answer(reader: asyncio.StreamReader) -> int | None:
    """The status code the gateway answers, or ``None`` if it closed without one."""
    line = await asyncio.wait_for(reader.readline(), PATIENCE)
    return int(line.split()[1]) if line else None


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the gateway closes the connection within :data:`PATIENCE` seconds."""
    try:
        while await asyncio.wait_for(reader.read(65536), PATIENCE):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def prove(port: int, node: Node) -> None:
    """One small honest call the stub SuperLink accepts: the gateway now trusts the key."""
    reader, writer = await connect(port)
    writer.write(head(node, length=4) + b"ping")
    assert await answer(reader) == 200
    writer.close()


def run(coro: Awaitable[None]) -> None:
    """Run on the gateway's own loop: uvloop (its TLS close differs from asyncio's)."""
    with asyncio.Runner(loop_factory=bounded_loop_factory(SMALL)) as runner:
        runner.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_an_oversized_content_length_is_refused_before_any_body_byte() -> None:
    async def main() -> None:
        upstream, stranger, member = Upstream(), Node(), Node()
        async with serve(upstream) as (port, _):
            await prove(port, member)
            for node, length, code in (
                (stranger, 200 * 2**20, 503),  # unproven key: "busy", nothing more
                (member, SMALL.max_body + 1, 413),  # a registered node over the run's bound
            ):
                reader, writer = await connect(port)
                writer.write(head(node, length=length))  # and no body at all
                assert await answer(reader) == code
                assert await closed(reader)
        assert upstream.bodies == [4]

    run(main())


def test_a_request_without_a_valid_signature_is_refused_before_its_body() -> None:
    async def main() -> None:
        upstream, node = Upstream(), Node()
        stale = node.headers(at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1))
        forged = {**Node().headers(), "flwr-public-key": node.headers()["flwr-public-key"]}
        async with serve(upstream) as (port, _):
            for headers in ({}, stale, forged):
                extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                reader, writer = await connect(port)
                writer.write(head(None, length=100, extra=extra))
                assert await answer(reader) == 401
                assert await closed(reader)
        assert upstream.bodies == []

    run(main())


def test_a_refused_body_is_not_read_to_its_end_over_tls(tmp_path: Path) -> None:
    """A TLS close waits for the peer's close_notify, reading all it sends; abort does not.

    The bytes read are this process's ``rchar`` (uvloop reads sockets with read()).
    """
    import ssl

    from fedtune.deploy.pki import make_tls

    files = make_tls(tmp_path / "certs", ca_dir=tmp_path / "ca", hosts=["127.0.0.1"])

    def bytes_read() -> int:  # this process's read()/recv() bytes: the gateway's, here
        return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])

    async def main() -> None:
        context = ssl.create_default_context(cafile=str(files.ca_cert))
        async with serve(Upstream(), tls=(files.server_cert, files.server_key)) as (port, _):
            before = bytes_read()
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
                writer.write(head(Node(), length=None))  # chunked, cut after 1 KiB
                answer = asyncio.create_task(reader.readline())
                with contextlib.suppress(OSError, ssl.SSLError):
                    while not answer.done():  # write ahead until the reply arrives
                        writer.write(b"10000\r\n" + b"\0" * 65536 + b"\r\n")
                        await writer.drain()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await asyncio.wait_for(answer, PATIENCE)
                writer.close()
            await asyncio.sleep(0.5)
            read = bytes_read() - before
        # uvloop's TLS close reads and decrypts what is in flight until the peer's
        # close_notify: 42 MB here for the 5 connections, 4 MB with the abort.
        assert read < 16 * 2**20

    run(main())


def test_a_tls_handshake_that_never_comes_is_cut_off(tmp_path: Path) -> None:
    from fedtune.deploy.pki import make_tls

    files = make_tls(tmp_path / "certs", ca_dir=tmp_path / "ca", hosts=["127.0.0.1"])

    async def main() -> None:
        async with serve(Upstream(), tls=(files.server_cert, files.server_key)) as (port, _):
            reader, _writer = await connect(port)  # TCP only: no ClientHello, ever
            assert await closed(reader)

    run(main())


def test_concurrent_unproven_requests_are_bounded() -> None:
    async def main() -> None:
        upstream = Upstream()
        async with serve(upstream) as (port, app):
            held = []
            for _ in range(SMALL.max_unproven_requests):
                reader, writer = await connect(port)
                writer.write(head(Node(), length=1000) + b"x" * 10)  # and the rest never
                held.append((reader, writer))
            await asyncio.sleep(0.1)
            reader, writer = await connect(port)
            writer.write(head(Node(), length=10) + b"x" * 10)
            assert await answer(reader) == 503
            assert app.admission.unproven_requests == SMALL.max_unproven_requests
        del held

    run(main())


def test_bytes_in_flight_of_registered_nodes_share_one_budget() -> None:
    async def main() -> None:
        upstream = Upstream()
        members = [Node() for _ in range(3)]
        async with serve(upstream) as (port, app):
            for node in members:
                await prove(port, node)
            held = []
            fits = SMALL.max_inflight_bytes // SMALL.max_body
            for node in members[:fits]:
                reader, writer = await connect(port)
                writer.write(head(node, length=SMALL.max_body) + b"x" * 100)
                held.append((reader, writer))
            await asyncio.sleep(0.1)
            assert app.admission.inflight_bytes == fits * SMALL.max_body
            reader, writer = await connect(port)
            writer.write(head(members[-1], length=SMALL.max_body))
            assert await answer(reader) == 503
            for _, writer in held:
                writer.close()
            await asyncio.sleep(SMALL.body_idle_timeout + 0.5)
            assert app.admission.inflight_bytes == 0

    run(main())


def test_a_slow_request_head_is_cut_off() -> None:
    async def main() -> None:
        async with serve(Upstream()) as (port, _):
            reader, writer = await connect(port)
            writer.write(f"POST {PUSH} HTTP/1.1\r\nHost: gateway\r\n".encode())
            for _ in range(6):  # one header byte per 0.2 s: never a complete head
                await asyncio.sleep(0.2)
                if writer.is_closing():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(b"X")
            assert await closed(reader)

    run(main())


def test_a_body_that_never_finishes_is_cut_off_and_not_forwarded_whole() -> None:
    async def main() -> None:
        upstream, node = Upstream(), Node()
        async with serve(upstream) as (port, app):
            await prove(port, node)
            reader, writer = await connect(port)
            writer.write(head(node, length=4096) + b"x" * 100)
            assert await answer(reader) in (408, None)
            assert await closed(reader)
            assert app.admission.inflight_bytes == 0
        assert upstream.bodies == [4]  # the cut body never reached the SuperLink as a request

    run(main())


def test_an_unproven_key_cannot_hold_a_slot_by_trickling_its_body() -> None:
    async def main() -> None:
        upstream = Upstream()
        async with serve(upstream) as (port, app):
            reader, writer = await connect(port)
            writer.write(head(Node(), length=SMALL.max_unproven_body))
            started = asyncio.get_running_loop().time()
            # Read alongside: the gateway's 408 fills the buffer, so `at_eof()` alone would
            # not see the close until the trickle ended (a flaky 4.3 s on a loaded machine).
            gone = asyncio.ensure_future(closed(reader))
            with contextlib.suppress(ConnectionError):
                for _ in range(40):  # a byte every 0.2 s: never idle for body_idle_timeout
                    if gone.done():
                        break
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.2)
            assert await gone
            took = asyncio.get_running_loop().time() - started
            assert took < SMALL.unproven_timeout + 2.0  # the trickle alone would take 8 s
            assert app.admission.unproven_requests == 0
        assert upstream.bodies == []

    run(main())


def test_chunked_bodies_are_counted_as_read() -> None:
    async def main() -> None:
        upstream, stranger, member = Upstream(), Node(), Node()
        chunk = b"%x\r\n%s\r\n" % (512, b"y" * 512)
        async with serve(upstream) as (port, _):
            await prove(port, member)
            for node, bound, code in (
                (stranger, SMALL.max_unproven_body, 503),
                (member, SMALL.max_body, 413),
            ):
                reader, writer = await connect(port)
                writer.write(head(node, length=None))
                sent = 0
                with contextlib.suppress(ConnectionError):
                    while sent <= 2 * bound and not writer.is_closing():
                        writer.write(chunk)
                        await writer.drain()
                        sent += 512
                assert await answer(reader) in (code, None)
                assert await closed(reader)
        assert upstream.bodies == [4]

    run(main())


def test_a_registered_nodes_body_is_streamed_not_buffered() -> None:
    async def main() -> None:
        node, first_bytes, sizes = Node(), asyncio.Event(), []

        async def superlink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # A real socket (httpx's MockTransport reads a body whole before answering).
            request_head = await reader.readuntil(b"\r\n\r\n")
            length = int(request_head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            got = len(await reader.readexactly(min(length, 100)))
            first_bytes.set()
            got += len(await reader.readexactly(length - got))
            sizes.append(got)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()

        upstream = await asyncio.start_server(superlink, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
        async with upstream, serve(Upstream(), url=url) as (port, app):
            app.admission.prove(node.public)
            reader, writer = await connect(port)
            writer.write(head(node, length=2 * 8192) + b"a" * 8192)
            # The SuperLink sees the first half while the second is still unsent.
            await asyncio.wait_for(first_bytes.wait(), PATIENCE)
            writer.write(b"b" * 8192)
            assert await answer(reader) == 200
        assert sizes == [2 * 8192]

    run(main())


def test_the_gateway_trusts_a_key_only_after_the_superlink_accepted_it() -> None:
    async def main() -> None:
        upstream, node = Upstream(status=401), Node()
        async with serve(upstream) as (port, app):
            reader, writer = await connect(port)
            writer.write(head(node, length=4) + b"ping")
            assert await answer(reader) == 401
            assert not app.admission.is_proven(node.public)
            upstream.status = 200
            await prove(port, node)
            assert app.admission.is_proven(node.public)
            upstream.status = 401  # unregistered since: forgotten on the next refusal
            reader, writer = await connect(port)
            writer.write(head(node, length=4) + b"ping")
            assert await answer(reader) == 401
            assert not app.admission.is_proven(node.public)

    run(main())


def test_connections_over_the_cap_are_closed_on_arrival() -> None:
    async def main() -> None:
        async with serve(Upstream()) as (port, _):
            held = [await connect(port) for _ in range(SMALL.max_connections)]
            await asyncio.sleep(0.1)
            reader, _writer = await connect(port)
            assert await closed(reader)
            del held

    run(main())


def test_signed_key_matches_flowers_check() -> None:
    node = Node()
    headers = [(k.encode(), v.encode()) for k, v in node.headers().items()]
    assert signed_key(headers) == node.public
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=400)
    assert signed_key(headers, now=later) is None
    assert signed_key(headers + headers[:1]) is None  # a repeated header is not a signature
    swapped = dict(node.headers())
    swapped["flwr-signature"] = Node().headers()["flwr-signature"]
    assert signed_key([(k.encode(), v.encode()) for k, v in swapped.items()]) is None


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_body", 0, "`max_body` must be an integer >= 1, got 0"),
        ("header_timeout", -1.0, "`header_timeout` must be seconds in \\(0, 86400\\), got -1.0"),
        ("max_unproven_body", 2**30, "`max_unproven_body` .* must not exceed `max_body`"),
        ("max_inflight_bytes", 1024, "`max_inflight_bytes` .* is below `max_body`.*Raise it"),
    ],
)
def test_limits_name_the_bad_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GatewayLimits(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--max-body-mib", "0"], "--max-body-mib 0 .*`max_body` must be an integer >= 1, got 0"),
        (["--max-body-mib", "8", "--max-inflight-mib", "4"], "`max_inflight_bytes` .* below"),
        (["--trainable-params", "0"], "--trainable-params 0 .*`trainable_params` must be"),
    ],
)
def test_the_command_line_names_a_bad_bound(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune.deploy.gateway import main

    base = ["--host", "127.0.0.1", "--port", "1", "--upstream-port", "2", "--certs", "/nonexistent"]
    with pytest.raises(SystemExit):
        main([*base, *argv])
    assert re.search(match, capsys.readouterr().err)


def test_the_largest_honest_body_follows_the_adapter_size() -> None:
    # 1,000,000 values: ceil(1e6 / 4096) = 245 ciphertexts of at most 4096 * 8 + 1024
    # bytes (N = 4096, one data prime, 8 B a coefficient, SEAL's header), 2x, + 1 MiB.
    assert honest_max_body(1_000_000) == 2 * 245 * 33_792 + 2**20 == 17_606_656
    with pytest.raises(ConfigError, match="`trainable_params` must be an integer >= 1, got 0"):
        honest_max_body(0)
