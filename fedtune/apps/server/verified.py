"""The server's side of verified aggregation: drop uploads key holders cannot authenticate.

The server cannot check an upload's tag (it has no key), so an upload made under
another key, or with a tampered seed or flipped bits, passes its checks and is
summed. Every key holder then refuses that global with
:data:`fedtune.secure.verify.BAD_TAGS` and the positions of the failing receipts,
a code computed from the key and the public receipts only, never from decrypted
values. :func:`verified_exchange` then drops those uploads, logs their names,
re-sums what is left and sends the round's messages again: the round completes
without them.

Honest key holders reach the same verdict (it depends on the key and the receipts
only), a lying one may name an honest upload, or accept a global whose tags fail.
So an upload is dropped only when a strict majority of the nodes that replied to
the exchange named it: one malicious node among three or more cannot get an honest
upload dropped, nor keep a bad one in. With two replies both must agree (a lying
node can then stall the round, which it could by not answering at all).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.apps.server.exchange import exchange
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.run.checkpoint import Checkpoint, save_checkpoint
from fedtune.secure.blame import blame_to_record, parse_blame
from fedtune.secure.multiparty.backend import MultipartyServerCodec
from fedtune.secure.verify import BAD_TAGS

__all__ = [
    "UNAUTHENTIC",
    "drop_uploads",
    "blame",
    "drop_unverified",
    "refused_positions",
    "verified_exchange",
]

log = logging.getLogger("fedtune.server")

_BAD = re.compile(re.escape(BAD_TAGS) + r":([0-9]{1,6}(?:,[0-9]{1,6}){0,9999})")


def refused_positions(msg: Message) -> set[int] | None:
    """The receipt positions a key holder's refusal names, or ``None`` (no such refusal)."""
    if not msg.has_error():
        return None
    found = _BAD.search(msg.error.reason or "")
    return None if found is None else {int(p) for p in found.group(1).split(",")}


def drop_unverified(strategy: FedTuneStrategy, replies: list[Message], server_round: int) -> bool:
    """Re-sum round ``server_round``'s global without the uploads key holders named.

    Returns ``True`` when the global changed (send the round's messages again).
    Nothing changes unless a strict majority of ``replies`` named a position, the
    uploads are in memory (not a resumed round) and ``min-clients`` would remain.
    """
    receipts, uploads = strategy.global_receipts, strategy.global_uploads
    votes: Counter[int] = Counter()
    for msg in replies:
        votes.update(refused_positions(msg) or set())
    if not votes or len(uploads) != len(receipts):
        return False
    agreed = {i for i, v in votes.items() if 2 * v > len(replies) and i < len(receipts)}
    return drop_uploads(strategy, agreed, server_round, UNAUTHENTIC)


UNAUTHENTIC = "key holders cannot authenticate it (made without the run's key, or changed)"
_OUT_OF_BOUNDS = "key holders found it out of bounds, decrypted alone (blame step)"


def drop_uploads(strategy: FedTuneStrategy, agreed: set[int], server_round: int, why: str) -> bool:
    """Drop the uploads at ``agreed`` from round ``server_round``'s global and re-sum."""
    receipts, uploads = strategy.global_receipts, strategy.global_uploads
    keep = [i for i in range(len(receipts)) if i not in agreed]
    if not agreed or len(keep) < strategy.min_clients:
        if agreed:
            log.warning(
                "Round %d: key holders refuse the uploads of %s; fewer than `min-clients` "
                "= %d would remain.",
                server_round,
                ", ".join(receipts[i].name for i in sorted(agreed)),
                strategy.min_clients,
            )
        return False
    for i in sorted(agreed):
        log.warning(
            "Round %d: dropped the upload of %s: %s; the round goes on without it.",
            server_round,
            receipts[i].name,
            why,
        )
    strategy.global_receipts = [receipts[i] for i in keep]
    strategy.global_uploads = [uploads[i] for i in keep]
    strategy.global_payload = strategy.codec.add(strategy.global_uploads)
    strategy.global_examples = sum(r.num_examples for r in strategy.global_receipts)
    strategy.unverified.update(receipts[i].name for i in agreed)
    notes = strategy.dropped_after_sum.setdefault(server_round, {})
    notes.update({receipts[i].name: why for i in agreed})
    return True


def blame(
    grid: Grid, strategy: FedTuneStrategy, nodes: list[int], server_round: int, timeout: float
) -> bool:
    """The blame step (:mod:`fedtune.secure.blame`, ``dp = "example"`` only).

    Sends round ``server_round``'s uploads with their receipts to ``nodes``; drops the
    positions a strict majority of them named. ``True`` when the global changed.
    """
    receipts, uploads = strategy.global_receipts, strategy.global_uploads
    if not strategy.blame_allowed or not nodes or len(uploads) != len(receipts) or not uploads:
        return False
    record = blame_to_record(uploads, receipts)
    messages = [
        Message(
            content=RecordDict(
                {
                    "config": ConfigRecord(
                        {"server-round": server_round, "blame-round": server_round}
                    ),
                    "blame": ConfigRecord(record),  # type: ignore[arg-type]
                }
            ),
            dst_node_id=n,
            message_type=MessageType.EVALUATE,
        )
        for n in nodes
    ]
    votes: Counter[int] = Counter()
    for reply in exchange(grid, messages, timeout=timeout):
        if reply.has_content() and "info" in reply.content.config_records:
            votes.update(parse_blame(reply.content.config_records["info"].get("blame")) or set())
    agreed = {i for i, v in votes.items() if 2 * v > len(nodes) and i < len(receipts)}
    log.info(
        "Round %d: blame step over %d uploads; named %s",
        server_round,
        len(receipts),
        sorted(agreed),
    )
    return drop_uploads(strategy, agreed, server_round, _OUT_OF_BOUNDS)


def verified_exchange(
    grid: Grid,
    strategy: FedTuneStrategy,
    messages: Callable[[], list[Message]],
    *,
    global_round: int,
    timeout: float,
    run_dir: Path | None = None,
) -> list[Message]:
    """:func:`fedtune.apps.server.exchange.exchange`, again without the uploads key holders refuse.

    ``messages()`` builds the exchange's messages from the strategy's current global
    (round ``global_round``'s sum); each retry drops at least one upload, so there
    are fewer retries than uploads. With ``run_dir``, the checkpoint of
    ``global_round`` is rewritten with the new sum (a resumed run starts from it).
    """
    sent = messages()
    replies = exchange(grid, sent, timeout=timeout)
    if isinstance(strategy.codec, MultipartyServerCodec):
        return replies  # ckks-multiparty: key holders checked the receipts before decrypting
    blamed = False
    while True:
        if drop_unverified(strategy, replies, global_round):
            pass
        elif not blamed and 2 * sum(m.has_error() for m in replies) > len(sent):
            blamed = True  # once per round: a well-formed upload may break the sum
            nodes = sorted({m.metadata.dst_node_id for m in sent})
            if not blame(grid, strategy, nodes, global_round, timeout):
                break
        else:
            break
        if run_dir is not None and strategy.global_payload is not None:
            save_checkpoint(
                run_dir / "checkpoint",
                Checkpoint(
                    round=global_round,
                    payload=strategy.global_payload,
                    num_examples=strategy.global_examples,
                    receipts=tuple(strategy.global_receipts),
                ),
                key_dir=run_dir,
            )
        sent = messages()
        replies = exchange(grid, sent, timeout=timeout)
    return replies
