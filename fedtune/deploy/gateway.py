"""The SuperLink's node-facing listener: Flower's Fleet API and nothing else.

Flower 1.41's ``flower-superlink`` serves every API on one HTTPS listener
(``--host`` / ``--port``): the Fleet API for SuperNodes (``/v1/fleet/...``), the
Control API for the ``flwr`` CLI (``/v1/control/...``: register nodes, start
runs, read logs) and the runtime API of the ServerApp (``/v1/runtime/...``). The
open-source Control API authenticates nobody (``NoOpControlAuthnPlugin``; account
login is Flower Enterprise only), and TLS here authenticates only the server, so
anyone who reaches that port could register a node of their own or submit a run,
whose code every SuperNode would then execute. ``--control-api-address`` and
``--fleet-api-address`` are deprecated no-ops in 1.41 (both APIs moved to HTTP).

fedtune therefore binds the SuperLink to ``127.0.0.1`` and puts this small
gateway on the address nodes dial. It terminates TLS with the same server
certificate and forwards exactly the ``POST /v1/fleet/<method>`` calls of
:data:`FLEET_PATHS` (Flower's own Fleet router, checked by a test) to the
SuperLink, headers and bytes unchanged, so Flower still checks every node's
signature. Anything else gets 404 without reaching the SuperLink. It is a path
filter in front of Flower's transport, not a transport of its own.

It also keeps unauthenticated peers from exhausting it or the SuperLink behind
it (issue 27: two 200 MiB bodies from a client holding only ``ca.crt`` once took
it to 1.7 GiB). Bodies are streamed, never held whole; what may be streamed is
decided from the headers before any body byte is read
(:mod:`fedtune.deploy.gateway_limits`: the node's signature checked as Flower
checks it, a small body and few concurrent requests for keys the SuperLink has
not yet accepted, a budget of bytes in flight for the others); connections whose
request head or body is too slow are closed
(:func:`fedtune.deploy.gateway_connection.guarded_protocol`).

Run it as ``python -m fedtune.deploy.gateway`` (``fedtune deploy superlink``
does so for you).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

from fedtune.deploy.gateway_connection import bounded_loop_factory, guarded_protocol
from fedtune.deploy.gateway_limits import (
    Admission,
    GatewayLimits,
    MiB,
    Ticket,
    honest_max_body,
    signed_key,
)
from fedtune.errors import BodyRefused, ConfigError

#: Every route of Flower 1.41's Fleet API (flwr/superlink/routers/fleet/router.py).
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
#: Fixed refusal texts: they name no limit, so a refusal teaches an attacker nothing.
_TEXTS = {
    400: "Bad Request.\n",
    401: "Invalid SuperNode authentication.\n",
    404: "Not Found: this port serves only the Fleet API.\n",
    408: "Request Timeout.\n",
    413: "Request body too large.\n",
    502: "SuperLink unavailable.\n",
    503: "Busy, retry later.\n",
}

log = logging.getLogger("fedtune.deploy.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _reply(send: Send, status: int) -> None:
    """A short fixed reply that closes the connection (no unread body is drained)."""
    body = _TEXTS[status].encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length; ``None`` for a chunked body, -1 if malformed."""
    lengths = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
    chunked = any(k.lower() == b"transfer-encoding" for k, _ in scope["headers"])
    if not lengths:
        return None if chunked else 0
    if len(lengths) > 1 or chunked or not lengths[0].isdigit() or len(lengths[0]) > 18:
        return -1
    return int(lengths[0])


class FleetGateway:
    """An ASGI app that forwards :data:`FLEET_PATHS` to ``upstream`` and refuses the rest.

    Parameters
    ----------
    upstream : str
        Base URL of the SuperLink, e.g. ``https://127.0.0.1:9093``.
    client_factory : Callable[[], httpx.AsyncClient]
        Makes the client that talks to the SuperLink (TLS verified against the
        deployment CA); tests pass one with a mock transport.
    limits : GatewayLimits
        Body sizes, concurrency, bytes in flight and timeouts
        (:class:`fedtune.deploy.gateway_limits.GatewayLimits`).
    """

    def __init__(
        self,
        upstream: str,
        client_factory: Callable[[], httpx.AsyncClient],
        *,
        limits: GatewayLimits | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self._factory = client_factory
        self._client: httpx.AsyncClient | None = None
        self.limits = GatewayLimits() if limits is None else limits
        self.admission = Admission(self.limits)
        self.refused: dict[int, int] = {}

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client = self._factory()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _refuse(self, send: Send, status: int, why: str, scope: Scope) -> None:
        count = self.refused.get(status, 0) + 1
        self.refused[status] = count
        if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th ...: a flood cannot flood the log
            log.warning(
                "refused %s from %s (%s; %d so far)", status, scope.get("client"), why, count
            )
        await _reply(send, status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method != "POST" or path not in FLEET_PATHS:
            await self._refuse(send, 404, f"{method} {path[:80]!r}: not a Fleet API call", scope)
            return
        length = _declared_length(scope)
        if length == -1:
            await self._refuse(send, 400, "malformed Content-Length / Transfer-Encoding", scope)
            return
        key = signed_key(scope["headers"])
        if key is None:
            await self._refuse(send, 401, "no valid fresh node signature", scope)
            return
        ticket = self.admission.admit(key, length)
        if ticket is None:
            too_big = self.admission.is_proven(key) and (length or 0) > self.limits.max_body
            await self._refuse(send, 413 if too_big else 503, "over a limit", scope)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            limits = self.limits
            deadline = limits.request_timeout if ticket.proven else limits.unproven_timeout
            async with asyncio.timeout(deadline):
                await self._forward(scope, receive, tracked, ticket, length)
        except TimeoutError:
            if not started:  # else uvicorn drops the connection of an unfinished reply
                await self._refuse(send, 408, "request took too long", scope)
        finally:
            ticket.release()

    def _body(self, receive: Receive, ticket: Ticket, length: int | None) -> AsyncIterator[bytes]:
        idle = self.limits.body_idle_timeout

        async def chunks() -> AsyncIterator[bytes]:
            read = 0
            more = length != 0
            while more:
                try:  # not wait_for: on 3.11 it can swallow the request deadline's cancel
                    async with asyncio.timeout(idle):
                        message = await receive()
                except TimeoutError:
                    raise BodyRefused(408) from None
                if message["type"] == "http.disconnect":
                    raise BodyRefused(0)
                chunk = message.get("body", b"")
                read += len(chunk)
                if length is None and not ticket.charge(read):
                    raise BodyRefused(413 if ticket.proven and read > ticket.max_body else 503)
                if length is not None and read > length:
                    raise BodyRefused(400)
                more = bool(message.get("more_body", False))
                if chunk:
                    yield chunk

        return chunks()

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, ticket: Ticket, length: int | None
    ) -> None:
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in _HOP_BY_HOP
        ]
        if length is not None:
            headers.append(("content-length", str(length)))
        if self._client is None:
            self._client = self._factory()
        path = scope["path"]
        request = self._client.build_request(
            "POST",
            self.upstream + path,
            headers=headers,
            content=self._body(receive, ticket, length),
        )
        try:
            response = await self._client.send(request, stream=True)
        except BodyRefused as refused:
            if refused.status:
                await self._refuse(send, refused.status, "body too slow or over a limit", scope)
            return
        except httpx.HTTPError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, BodyRefused):
                if cause.status:
                    await self._refuse(send, cause.status, "body too slow or over a limit", scope)
                return
            log.warning("SuperLink unreachable for %s: %s", path, exc)
            await _reply(send, 502)
            return
        if 200 <= response.status_code < 300:
            self.admission.prove(ticket.key)
        elif response.status_code == 401:
            self.admission.forget(ticket.key)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.lower() not in _HOP_BY_HOP - {b"content-length"}
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def upstream_client(ca: Path) -> Callable[[], httpx.AsyncClient]:
    """A factory of clients that verify the SuperLink against the deployment CA."""

    def make() -> httpx.AsyncClient:
        context = ssl.create_default_context(cafile=str(ca))
        return httpx.AsyncClient(
            verify=context,
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    return make


def main(argv: list[str] | None = None) -> int:
    """Serve the gateway until SIGTERM / SIGINT."""
    import uvicorn

    defaults = GatewayLimits()
    p = argparse.ArgumentParser(prog="python -m fedtune.deploy.gateway", description=__doc__)
    p.add_argument("--host", required=True, help="the node-facing address to listen on")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--upstream-port", required=True, type=int, help="the SuperLink on 127.0.0.1")
    p.add_argument("--certs", required=True, type=Path, help="ca.crt, server.pem, server.key")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--trainable-params",
        type=int,
        default=None,
        help="the adapter's parameter count: the largest body from a registered node is then "
        "its largest honest update with 2x margin (fedtune.deploy.gateway_limits.honest_max_body)",
    )
    size.add_argument(
        "--max-body-mib",
        type=int,
        default=defaults.max_body // MiB,
        help="largest body from a registered node, in MiB (default %(default)s)",
    )
    p.add_argument(
        "--max-inflight-mib",
        type=int,
        default=None,
        help="body MiB of registered nodes in flight at once (default 4x the largest body)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s fleet-gateway: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call
    what = f"--max-body-mib {args.max_body_mib}"
    if args.trainable_params is not None:
        what = f"--trainable-params {args.trainable_params}"
    try:
        if args.trainable_params is not None:
            max_body = honest_max_body(args.trainable_params)
        else:
            max_body = args.max_body_mib * MiB
        limits = GatewayLimits(
            max_body=max_body,
            max_unproven_body=min(defaults.max_unproven_body, max(1, max_body)),
            max_inflight_bytes=args.max_inflight_mib * MiB
            if args.max_inflight_mib
            else 4 * max_body,
        )
    except ConfigError as err:
        p.error(f"{what} / --max-inflight-mib: {err}")
    app = FleetGateway(
        f"https://127.0.0.1:{args.upstream_port}",
        upstream_client(args.certs / "ca.crt"),
        limits=limits,
    )
    log.info(
        "Fleet API on %s:%d -> SuperLink 127.0.0.1:%d (Control and runtime APIs not forwarded); %s",
        args.host,
        args.port,
        args.upstream_port,
        limits,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=str(args.certs / "server.pem"),
        ssl_keyfile=str(args.certs / "server.key"),
        log_level="warning",
        access_log=False,
        lifespan="on",
        http=guarded_protocol(limits),
        timeout_keep_alive=int(limits.header_timeout),
    )
    server = uvicorn.Server(config)
    with asyncio.Runner(loop_factory=bounded_loop_factory(limits)) as runner:
        runner.run(server.serve())
    if not server.started:
        return 3  # uvicorn's own exit status for a failed start (it logged why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
