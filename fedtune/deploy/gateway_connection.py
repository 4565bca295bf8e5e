"""The gateway's connections: a cap, deadlines for the handshake and request head, resets.

uvicorn bounds how large a request head may be (h11: 16 KiB) but neither how
long it or the TLS handshake before it may take (uvloop's default handshake
timeout is 60 s) nor how many connections may be open, and it closes a TLS
connection politely even when the peer is still streaming a refused body. The
protocol class of :func:`guarded_protocol` and the event loop of
:func:`bounded_loop_factory` add those guards to uvicorn's own h11 protocol and
loop; :class:`fedtune.deploy.gateway.FleetGateway` decides about requests, this
module only about connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedtune.deploy.gateway_limits import GatewayLimits


class _AbortUnread:
    """A transport whose ``close()`` drops the connection while the peer is mid-body.

    uvloop's ``close()`` of a TLS transport first waits for the peer's
    close_notify, reading and decrypting whatever the peer still sends: what
    is in flight of a refused body, or all of it from a peer that ignores the
    close. ``benchmarks/bench_gateway.py`` saw the gateway read 0.8 to 1.3 GiB
    in 8 s that way (about 0.1 GiB with the abort); ``tests/test_gateway.py``
    42 MB against 4 MB. Aborting sends a TCP reset instead; an honest Flower
    client treats that like the 503 it may not see (a transport error, which
    it retries).
    """

    def __init__(self, transport: asyncio.Transport, protocol: H11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        if self._protocol.conn.their_state is h11.SEND_BODY:
            self._transport.abort()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(limits: GatewayLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a request-head deadline.

    uvicorn bounds the size of a request head (h11, 16 KiB) but not the time it
    may take: a client that sends one header byte every few seconds (slowloris)
    holds its connection forever. This protocol closes a connection whose
    request head is not complete ``limits.header_timeout`` seconds after the
    connection opened or its previous response ended, and closes connections on
    arrival while ``limits.max_connections`` are open. Body reads are paced by
    uvicorn's flow control (it stops reading a socket at 64 KiB not yet taken by
    the app) and timed by :class:`fedtune.deploy.gateway.FleetGateway`.
    """

    class GuardedH11Protocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(cast(asyncio.Transport, _AbortUnread(transport, self)))
            if len(self.connections) > limits.max_connections:
                transport.abort()
                return
            self._arm()

        def _arm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(limits.header_timeout, self._head_late)

        def _head_late(self) -> None:
            self._head_deadline = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.abort()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None
            super().connection_lost(exc)

    return GuardedH11Protocol


def bounded_loop_factory(limits: GatewayLimits) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop (uvicorn's own choice), whose TLS servers time out handshakes.

    A peer that opens a TCP connection and never finishes the TLS handshake is
    never seen by the protocol (its ``connection_made`` comes after the
    handshake), so neither :attr:`GatewayLimits.max_connections` nor the head
    deadline applies to it; uvicorn passes no handshake timeout, and uvloop's
    default is 60 s. This loop gives every TLS server it creates
    ``ssl_handshake_timeout = limits.header_timeout``.
    """
    import uvloop

    class HandshakeBoundedLoop(uvloop.Loop):  # type: ignore[misc]
        async def create_server(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", limits.header_timeout)
            return await super().create_server(*args, **kwargs)

    return HandshakeBoundedLoop
