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

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.run.checkpoint import Checkpoint, save_checkpoint
from fedtune.secure.verify import BAD_TAGS
from server.exchange import exchange
from server.strategy import FedTuneStrategy

__all__ = ["drop_unverified", "refused_positions", "verified_exchange"]

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
            "Round %d: dropped the upload of %s: key holders cannot authenticate it (made "
            "without the run's key, or changed in transit); the round goes on without it.",
            server_round,
            receipts[i].name,
        )
    strategy.global_receipts = [receipts[i] for i in keep]
    strategy.global_uploads = [uploads[i] for i in keep]
    strategy.global_payload = strategy.codec.add(strategy.global_uploads)
    strategy.global_examples = sum(r.num_examples for r in strategy.global_receipts)
    strategy.unverified.update(receipts[i].name for i in agreed)
    return True


def verified_exchange(
    grid: Grid,
    strategy: FedTuneStrategy,
    messages: Callable[[], list[Message]],
    *,
    global_round: int,
    timeout: float,
    run_dir: Path | None = None,
) -> list[Message]:
    """:func:`server.exchange.exchange`, again without the uploads key holders refuse.

    ``messages()`` builds the exchange's messages from the strategy's current global
    (round ``global_round``'s sum); each retry drops at least one upload, so there
    are fewer retries than uploads. With ``run_dir``, the checkpoint of
    ``global_round`` is rewritten with the new sum (a resumed run starts from it).
    """
    replies = exchange(grid, messages(), timeout=timeout)
    while drop_unverified(strategy, replies, global_round):
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
        replies = exchange(grid, messages(), timeout=timeout)
    return replies
