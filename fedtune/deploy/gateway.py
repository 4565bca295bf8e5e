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

Run it as ``python -m fedtune.deploy.gateway`` (``fedtune deploy superlink``
does so for you).
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

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
#: Largest request body forwarded (an encrypted adapter update is tens of MB).
MAX_BODY_BYTES = 512 * 2**20
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

log = logging.getLogger("fedtune.deploy.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _reply(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class FleetGateway:
    """An ASGI app that forwards :data:`FLEET_PATHS` to ``upstream`` and refuses the rest.

    Parameters
    ----------
    upstream : str
        Base URL of the SuperLink, e.g. ``https://127.0.0.1:9093``.
    client_factory : Callable[[], httpx.AsyncClient]
        Makes the client that talks to the SuperLink (TLS verified against the
        deployment CA); tests pass one with a mock transport.
    max_body : int
        Requests with a longer body get 413.
    """

    def __init__(
        self,
        upstream: str,
        client_factory: Callable[[], httpx.AsyncClient],
        *,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self._factory = client_factory
        self._client: httpx.AsyncClient | None = None
        self.max_body = max_body

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        client = scope.get("client")
        if method != "POST" or path not in FLEET_PATHS:
            log.warning("refused %s %s from %s: not a Fleet API call", method, path, client)
            await _reply(send, 404, "Not Found: this port serves only the Fleet API.\n")
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_body:
                await _reply(send, 413, f"Request body over {self.max_body} bytes.\n")
                return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in _HOP_BY_HOP
        ]
        if self._client is None:
            self._client = self._factory()
        request = self._client.build_request(
            "POST", self.upstream + path, headers=headers, content=bytes(body)
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable for %s: %s", path, exc)
            await _reply(send, 502, "SuperLink unavailable.\n")
            return
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
    import uvicorn  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m fedtune.deploy.gateway", description=__doc__)
    p.add_argument("--host", required=True, help="the node-facing address to listen on")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--upstream-port", required=True, type=int, help="the SuperLink on 127.0.0.1")
    p.add_argument("--certs", required=True, type=Path, help="ca.crt, server.pem, server.key")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s fleet-gateway: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call
    app = FleetGateway(
        f"https://127.0.0.1:{args.upstream_port}", upstream_client(args.certs / "ca.crt")
    )
    log.info(
        "Fleet API on %s:%d -> SuperLink 127.0.0.1:%d (Control and runtime APIs not forwarded)",
        args.host,
        args.port,
        args.upstream_port,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=str(args.certs / "server.pem"),
        ssl_keyfile=str(args.certs / "server.key"),
        log_level="warning",
        access_log=False,
        lifespan="on",
        workers=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
