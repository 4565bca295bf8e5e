"""The counts replies claim (their FedAvg weights) and the means they weight.

A count is an untrusted number: a node claiming 50,000 held-out examples beside
400-example clients would decide the reported accuracy, and in training its
update would outweigh theirs 125x. Each count is held to the node's own limit
(registered by the operator, else ``max-client-examples``) and, relative to the
round, to ``max-weight-factor`` times the upper median of the counts the round's
*other* replies claim (:func:`check_weight`). With the threat model's one
malicious node that reference is never above the honest counts around it, and a
low claim cannot lower it below them: with three or more replies, an honest
node's reference is at least the smaller of the other honest counts it sits
between. With two replies the other's count is the reference.

Means are checked too (:func:`finite_means`): a non-finite weighted mean is left
out of the round's metrics, with a log line, never written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

from flwr.app import Message, MessageType

from fedtune.apps.server.replies import read_metric, reply_node
from fedtune.errors import WirePayloadError as PayloadError

__all__ = ["check_weight", "claimed_counts", "count_record", "finite_means"]

log = logging.getLogger("fedtune.server")


def count_record(msg: Message, phase: str) -> str:
    """Where a reply of ``phase`` keeps its count (a train reply's evaluation: its own)."""
    train = msg.metadata.message_type == MessageType.TRAIN
    return "evaluation" if phase == "evaluate" and train else "metrics"


def claimed_counts(
    replies: Iterable[Message],
    sent_to: Mapping[str, int],
    phase: str,
    limit_of: Callable[[int], int],
) -> dict[int, float]:
    """Each node's first claimed count of ``phase``, held to its own limit (``limit_of``).

    The reference of :func:`check_weight`; a reply without a usable count adds nothing.
    """
    claims: dict[int, float] = {}
    for msg in replies:
        if msg.has_error() or not msg.has_content():
            continue
        node = reply_node(msg, dict(sent_to))
        if node in claims:
            continue
        try:
            n = read_metric(msg, "num-examples", record=count_record(msg, phase))
        except (PayloadError, KeyError, TypeError):
            continue
        if n >= 1:
            claims[node] = min(n, limit_of(node))
    return claims


def check_weight(n: int, node: int, claims: Mapping[int, float], factor: float) -> None:
    """Refuse a count over ``factor`` x the upper median of the other nodes' claims.

    Raises
    ------
    PayloadError
        Naming the count, the factor and the reference; never with ``factor = 0``
        (off) or when ``node`` is the only one with a claim.
    """
    others = sorted(c for other, c in claims.items() if other != node)
    if factor <= 0 or not others:
        return
    reference = others[len(others) // 2]
    if n > factor * reference:
        raise PayloadError(
            f"num-examples {n} is more than `max-weight-factor` ({factor:g}) x "
            f"{reference:g}, the median count of the round's other replies; one node "
            "may not outweigh the others by more (raise `max-weight-factor`, 0 = off)."
        )


def finite_means(metrics: Mapping[str, float], server_round: int, phase: str) -> dict[str, float]:
    """``metrics`` without non-finite values (each dropped with a log line)."""
    kept = {k: v for k, v in metrics.items() if math.isfinite(v)}
    for key in sorted(set(metrics) - set(kept)):
        log.warning(
            "Round %d: the %s mean of %s is %r; left out of the metrics.",
            server_round,
            phase,
            key,
            metrics[key],
        )
    return kept
