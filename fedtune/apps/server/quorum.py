"""The quorum side of the multiparty decryption step: who is live, and asking them.

:func:`probe` sends the ``ready`` probe (a fixed reply, nothing computed from a secret)
and returns the live key holders; :func:`ask` sends one decryption request to its quorum
and the *same* request again to a member that did not answer, until a deadline
(docs/multiparty.md, "Dropouts, retries and resume"). The decision what to ask is
:mod:`fedtune.apps.server.multiparty`'s.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.apps.server.exchange import exchange
from fedtune.apps.server.replies import clean_reason, stated_name
from fedtune.apps.server.verified import refused_positions
from fedtune.secure.multiparty import rounds
from fedtune.secure.multiparty.protocol import DecryptionRequest, PartialDecryption
from fedtune.secure.verify import CODES, receipts_to_record

__all__ = ["RETRY_FIRST", "RETRY_MAX", "Answers", "ask", "probe"]

log = logging.getLogger("fedtune.server")

#: Seconds before a ``decrypt`` message is sent again to a member that did not answer
#: (doubling, up to :data:`RETRY_MAX`), until ``round-timeout``.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


def _partial(reply: Message) -> rounds.SignedPartial | None:
    if reply.has_error() or "partial" not in reply.content.config_records:
        return None
    rec = reply.content.config_records["partial"]
    name, sig, chunks = rec.get("name"), rec.get("signature"), rec.get("chunks")
    if (
        not isinstance(name, str)
        or not isinstance(sig, bytes)
        or not isinstance(chunks, list)
        or not all(isinstance(c, bytes) for c in chunks)
    ):
        return None
    parts = tuple(c for c in chunks if isinstance(c, bytes))
    return rounds.SignedPartial(PartialDecryption(name, b"", parts), sig)


def probe(
    grid: Grid,
    nodes: Sequence[int],
    *,
    server_round: int,
    timeout: float,
    enough: Callable[[Mapping[str, int]], bool],
) -> dict[str, int]:
    """Send the ``ready`` probe to ``nodes``; the live key holders' names -> node ids.

    Stops as soon as ``enough(live)`` holds (or all answered, or ``timeout`` passed).
    A reply counts if it is not an error, says ``ready = 1`` and states a name; a name
    claimed by two nodes counts for neither.
    """

    def live(replies: list[Message]) -> dict[str, int]:
        seen: dict[str, set[int]] = {}
        for msg in replies:
            name = stated_name(msg)
            if name is None or msg.has_error():
                continue
            if msg.content.config_records["info"].get("ready") != 1:
                continue
            seen.setdefault(name, set()).add(msg.metadata.src_node_id)
        return {n: next(iter(ids)) for n, ids in seen.items() if len(ids) == 1}

    messages = [
        Message(
            content=RecordDict(
                {
                    "config": ConfigRecord({"server-round": server_round}),
                    "ready": ConfigRecord({"mp-round": server_round}),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in nodes
    ]
    replies = exchange(grid, messages, timeout=timeout, enough=lambda r: enough(live(r)))
    return live(replies)


@dataclass
class Answers:
    """What the quorum sent back for one request."""

    got: dict[str, rounds.SignedPartial] = field(default_factory=dict)
    votes: Counter[int] = field(default_factory=Counter)
    #: member -> its last refusal (a fixed code) or "no reply"
    refused: dict[str, str] = field(default_factory=dict)


def _final(reason: str) -> bool:
    """A refusal that the same request would get again (a verification code)."""
    return any(code in reason for code in CODES)


def ask(
    grid: Grid,
    request: DecryptionRequest,
    nodes: Mapping[str, int],
    *,
    deadline: float,
) -> Answers:
    """Send ``request`` to its quorum; again to whoever did not answer, until ``deadline``.

    Stops early when every member answered, or every missing one refused with a
    verification code (the same request would be refused again), or a strict majority
    of the quorum named uploads whose signatures fail (they are dropped by the caller).
    """
    record: dict[str, Any] = {
        **receipts_to_record(request.receipts),
        "num-examples": request.num_examples,
        "mp-round": request.server_round,
        "mp-quorum": list(request.quorum),
    }
    by_node = {node: name for name, node in nodes.items()}
    out = Answers()
    missing = [n for n in request.quorum if n in nodes]
    out.refused = {n: "not reachable" for n in request.quorum if n not in nodes}
    wait = RETRY_FIRST
    while missing:
        messages = [
            Message(
                content=RecordDict(
                    {
                        "config": ConfigRecord({"server-round": request.server_round}),
                        "decrypt": ConfigRecord(record),
                    }
                ),
                dst_node_id=nodes[name],
                message_type=MessageType.EVALUATE,
            )
            for name in missing
        ]
        replies = exchange(grid, messages, timeout=max(deadline - time.monotonic(), 0.1))
        votes: Counter[int] = Counter()
        for name in missing:
            out.refused[name] = "no reply"
        for reply in replies:
            holder = by_node.get(reply.metadata.src_node_id)
            if holder is None or holder not in missing:
                continue
            name = holder
            signed = _partial(reply)
            if signed is not None and signed.partial.name == name:
                out.got[name] = signed
                out.refused.pop(name, None)
            elif reply.has_error():
                reason = clean_reason(reply.error.reason)
                out.refused[name] = reason
                log.warning(
                    "Round %d: key holder %s refused: %s", request.server_round, name, reason
                )
                votes.update(refused_positions(reply) or set())
        out.votes = votes
        missing = [n for n in request.quorum if n not in out.got and n in nodes]
        quorum = len(request.quorum)
        if any(2 * v > quorum for v in votes.values()):
            break  # uploads the quorum refuses: dropped, then a new request
        if all(_final(out.refused.get(n, "")) for n in missing):
            break
        if time.monotonic() + wait >= deadline:
            break
        log.warning(
            "Round %d: no partial decryption yet from %s; the same request again in %.1f s.",
            request.server_round,
            ", ".join(missing),
            wait,
        )
        time.sleep(wait)
        wait = min(2 * wait, RETRY_MAX)
    return out
