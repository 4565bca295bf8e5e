"""What the Fleet gateway admits before the SuperLink has authenticated anyone.

Flower 1.41's SuperLink reads a whole request body into memory, parses it as
protobuf, and only then checks the node's signature (its
``ProtobufTranslationMiddleware`` runs before ``NodeAuthMiddleware``). Whoever
reaches the Fleet port with nothing but ``ca.crt`` could therefore make it hold
any number of bodies of up to the gateway's size cap. This module decides, from
a request's **headers alone**, whether the gateway may stream its body on:

* **Signature.** A SuperNode signs the current time with its key and sends the
  key, the time and the signature as headers (``flwr-public-key``,
  ``flwr-timestamp``, ``flwr-signature``; ``flwr/supernode/
  node_auth_http_interceptor.py``). :func:`signed_key` checks them exactly as
  the SuperLink does (same ECDSA check, same time window), so a request that
  fails here would fail there, and an honest node never sees the difference.
* **Proven keys.** A valid signature only proves possession of *some* key;
  anyone can make one. Whether the key is registered only the SuperLink knows,
  and it says so by answering 2xx to a request signed with it. The gateway
  remembers such keys (:class:`Admission`), forgets one on a 401, and gives
  requests from keys not (yet) proven only a small body and a small share of
  concurrent requests. Honest SuperNodes start with small calls (activate,
  heartbeat, pull), so they are proven long before they push an update.
* **Bytes in flight.** Requests from proven keys share a budget of declared (or,
  for chunked bodies, received) bytes and a per-key request count, so one
  malicious registered node cannot take the whole budget either.

Refusals for capacity are one fixed ``503`` that Flower's HTTP retry treats as
transient (``flwr/supercore/retry/http_retry.py`` retries 502/503/504 with
backoff), so an honest node waits and retries; an attacker learns only
"busy".
"""

from __future__ import annotations

import binascii
import datetime
from base64 import b64decode
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

from fedtune.crypto.params import DEFAULT_PARAMS, CkksParams
from fedtune.errors import ConfigError

MiB = 2**20
#: Longest value accepted for each authentication header (a node's P-384 public key is
#: sent as base64 of its 215-byte PEM, 288 characters; a DER signature ~140, a timestamp ~32).
_MAX_AUTH_HEADER = 512


def honest_max_body(
    trainable_params: int,
    *,
    params: CkksParams = DEFAULT_PARAMS,
    margin: float = 2.0,
    envelope: int = MiB,
) -> int:
    """The largest body an honest node sends for an adapter of ``trainable_params`` values.

    A node's largest message is its update: ``params.chunk_count(P)`` CKKS
    ciphertexts of at most ``params.max_chunk_bytes(polys=1)`` bytes each (a
    seeded upload, uncompressed: 8.25 B per value with the default parameters;
    the ``plain`` backend's float64 takes 8). The bound is that times
    ``margin``, plus ``envelope`` bytes for Flower's message and the node's
    metrics. With the default parameters and 1,000,000 values:
    ``2 * 245 * 33,792 + 2**20 = 17,606,656`` bytes.
    """
    if not isinstance(trainable_params, int) or trainable_params < 1:
        raise ConfigError(
            f"`trainable_params` must be an integer >= 1, got {trainable_params!r}: the "
            "adapter's parameter count (fedtune prints it when a run starts)."
        )
    if not margin >= 1.0:
        raise ConfigError(f"`margin` must be >= 1, got {margin!r}.")
    payload = params.chunk_count(trainable_params) * params.max_chunk_bytes(polys=1)
    return int(margin * payload) + envelope


@dataclass(frozen=True)
class GatewayLimits:
    """Every bound the gateway enforces, checked once.

    Parameters
    ----------
    max_body : int
        Largest body a proven node may send (bytes): the largest honest
        message of the run with margin, :func:`honest_max_body`.
    max_unproven_body : int
        Largest body from a key the SuperLink has not yet accepted. Flower's
        first calls (activate-node, heartbeat, pull-messages) are a few hundred
        bytes.
    max_unproven_requests : int
        Requests from unproven keys (or with no valid signature header yet
        checked) in flight at once, over all clients.
    max_requests_per_key : int
        Requests of one proven key in flight at once. A Flower SuperNode makes
        at most about four (two concurrent object pushes or pulls,
        ``FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES``, its heartbeat and its
        message loop); more get 503 and are retried by Flower.
    max_inflight_bytes : int
        Body bytes of proven keys in flight at once, over all keys: declared
        ``Content-Length`` reserved up front, chunked bodies counted as read.
    max_connections : int
        Open (TLS-established) connections; more are closed on arrival.
    header_timeout : float
        Seconds from a connection's start (or its previous response) to a
        complete request head; slower connections are closed (slowloris).
    body_idle_timeout : float
        Longest pause between two pieces of a body (seconds).
    request_timeout : float
        Longest a whole request of a proven key may take, body and response
        (seconds).
    unproven_timeout : float
        Longest a whole request of an unproven key may take (seconds): its body
        is small, so a slot of :attr:`max_unproven_requests` cannot be held by
        trickling one byte per :attr:`body_idle_timeout`.
    max_proven_keys : int
        Proven keys remembered (least recently used forgotten first).
    """

    max_body: int = 64 * MiB
    max_unproven_body: int = 1 * MiB
    max_unproven_requests: int = 8
    max_requests_per_key: int = 8
    max_inflight_bytes: int = 256 * MiB
    max_connections: int = 512
    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    request_timeout: float = 600.0
    unproven_timeout: float = 10.0
    max_proven_keys: int = 10_000

    def __post_init__(self) -> None:
        for name in (
            "max_body",
            "max_unproven_body",
            "max_unproven_requests",
            "max_requests_per_key",
            "max_inflight_bytes",
            "max_connections",
            "max_proven_keys",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Gateway limit `{name}` must be an integer >= 1, got {value!r}.")
        for name in ("header_timeout", "body_idle_timeout", "request_timeout", "unproven_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < 86_400:
                raise ConfigError(
                    f"Gateway limit `{name}` must be seconds in (0, 86400), got {value!r}."
                )
        if self.max_unproven_body > self.max_body:
            raise ConfigError(
                f"Gateway limit `max_unproven_body` ({self.max_unproven_body}) must not exceed "
                f"`max_body` ({self.max_body}); lower it or raise `max_body`."
            )
        if self.max_inflight_bytes < self.max_body:
            raise ConfigError(
                f"Gateway limit `max_inflight_bytes` ({self.max_inflight_bytes}) is below "
                f"`max_body` ({self.max_body}): no body of the largest honest size could "
                "ever pass. Raise it to at least `max_body` (a few times, for several nodes)."
            )


def _header(headers: Iterable[tuple[bytes, bytes]], name: str) -> bytes | None:
    key = name.encode("ascii")
    found = [v for k, v in headers if k.lower() == key]
    if len(found) != 1 or len(found[0]) > _MAX_AUTH_HEADER:
        return None
    return found[0]


def signed_key(
    headers: Iterable[tuple[bytes, bytes]], *, now: datetime.datetime | None = None
) -> bytes | None:
    """The node public key whose valid, fresh signature the headers carry; else ``None``.

    The same check as Flower's ``authenticate_node``
    (``flwr/superlink/routers/fleet/node_auth.py``): the ECDSA signature of
    the ``flwr-timestamp`` value under the ``flwr-public-key`` key, the
    timestamp no older than ``TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE``
    seconds and not from the future beyond ``SYSTEM_TIME_TOLERANCE``.
    """
    headers = list(headers)
    raw_key = _header(headers, FLEET_HTTP_PUBLIC_KEY_HEADER)
    raw_sig = _header(headers, FLEET_HTTP_SIGNATURE_HEADER)
    raw_ts = _header(headers, TIMESTAMP_HEADER)
    if raw_key is None or raw_sig is None or raw_ts is None:
        return None
    try:
        public_key = b64decode(raw_key, validate=True)
        signature = b64decode(raw_sig, validate=True)
        timestamp = raw_ts.decode("ascii")
        signed_at = datetime.datetime.fromisoformat(timestamp)
        current = now or datetime.datetime.now(datetime.UTC)
        age = (current - signed_at).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return None
        if not verify_signature(bytes_to_public_key(public_key), timestamp.encode(), signature):
            return None
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        return None
    return public_key


class Ticket:
    """One admitted request's share of the limits; :meth:`release` it exactly once."""

    def __init__(self, admission: Admission, key: bytes, proven: bool, reserved: int) -> None:
        self._admission = admission
        self.key = key
        self.proven = proven
        self.reserved = reserved
        self.max_body = admission.limits.max_body if proven else admission.limits.max_unproven_body
        self._released = False

    def charge(self, total_read: int) -> bool:
        """Account a chunked body read so far; ``False`` once it passes a bound."""
        if total_read > self.max_body:
            return False
        if total_read <= self.reserved:
            return True
        extra = total_read - self.reserved
        if self.proven:
            if self._admission.inflight_bytes + extra > self._admission.limits.max_inflight_bytes:
                return False
            self._admission.inflight_bytes += extra
        self.reserved = total_read
        return True

    def release(self) -> None:
        """Give the request's slot and bytes back."""
        if self._released:
            return
        self._released = True
        self._admission._release(self)


class Admission:
    """The gateway's shared counters (one event loop; no locks needed).

    Parameters
    ----------
    limits : GatewayLimits
        The bounds to enforce.
    """

    def __init__(self, limits: GatewayLimits) -> None:
        self.limits = limits
        self.unproven_requests = 0
        self.inflight_bytes = 0
        self._per_key: dict[bytes, int] = {}
        self._proven: OrderedDict[bytes, None] = OrderedDict()

    def is_proven(self, key: bytes) -> bool:
        """Whether the SuperLink has accepted a request signed with ``key``."""
        return key in self._proven

    def prove(self, key: bytes) -> None:
        """Remember that the SuperLink answered 2xx to a request signed with ``key``."""
        self._proven[key] = None
        self._proven.move_to_end(key)
        while len(self._proven) > self.limits.max_proven_keys:
            self._proven.popitem(last=False)

    def forget(self, key: bytes) -> None:
        """Stop trusting ``key`` (the SuperLink answered 401: unregistered or revoked)."""
        self._proven.pop(key, None)

    def admit(self, key: bytes, declared: int | None) -> Ticket | None:
        """A ticket for a request signed with ``key`` declaring ``declared`` bytes, or ``None``.

        ``None`` means refuse now (before reading any body byte): the declared
        length is over the key's bound, or its share of requests or bytes is
        taken. ``declared=None`` is a chunked body, charged as it is read.
        """
        limits = self.limits
        proven = self.is_proven(key)
        bound = limits.max_body if proven else limits.max_unproven_body
        reserve = 0 if declared is None else declared
        if reserve > bound:
            return None
        if proven:
            if self._per_key.get(key, 0) >= limits.max_requests_per_key:
                return None
            if self.inflight_bytes + reserve > limits.max_inflight_bytes:
                return None
            self._per_key[key] = self._per_key.get(key, 0) + 1
            self.inflight_bytes += reserve
        else:
            if self.unproven_requests >= limits.max_unproven_requests:
                return None
            self.unproven_requests += 1
        return Ticket(self, key, proven, reserve)

    def _release(self, ticket: Ticket) -> None:
        if ticket.proven:
            self.inflight_bytes -= ticket.reserved
            left = self._per_key.get(ticket.key, 1) - 1
            if left > 0:
                self._per_key[ticket.key] = left
            else:
                self._per_key.pop(ticket.key, None)
        else:
            self.unproven_requests -= 1
