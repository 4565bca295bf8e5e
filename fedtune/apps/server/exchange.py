"""The ServerApp's side of an exchange: send a round's messages, collect the replies.

Also the train half of a round, kept on disk until its evaluation arrives with the next
round's replies (:data:`PENDING`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["PENDING", "POLL_SECONDS", "exchange", "load_pending", "save_pending"]


#: Seconds between two looks for replies (Flower's deployed Grid waits 3 s between them).
POLL_SECONDS = 0.2


def exchange(
    grid: Grid,
    messages: list[Message],
    *,
    timeout: float,
    enough: Callable[[list[Message]], bool] | None = None,
) -> list[Message]:
    """Send ``messages`` and collect their replies until all are in or ``timeout`` passed.

    Flower's ``Grid.send_and_receive``, looking for replies every :data:`POLL_SECONDS`
    instead of every 3 s (its deployed Grid's fixed interval): a round ends when its
    last reply arrives, not up to 3 s later. ``enough(replies)``: stop as soon as it
    holds (the multiparty liveness probe stops at ``t`` live key holders).
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies += arrived
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if not pending or time.monotonic() >= deadline or (enough and enough(replies)):
            break
        time.sleep(POLL_SECONDS)
    return replies


#: The train half of the last trained round, kept until its evaluation arrives with
#: the next round's replies (so a resumed server still writes it).
PENDING = "pending-round.json"


def save_pending(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Keep ``record`` (a round's train half) in ``RUN_DIR/PENDING`` with the one before.

    Two are kept, replaced atomically, so a server that stops between writing round
    ``r``'s checkpoint and this file, or just after, still finds the train half of the
    round its checkpoint holds; the file stays after the run (a resumed finished run
    writes its last line again, whole).
    """
    path = run_dir / PENDING
    kept = [r for r in _read(path) if r.get("round") != record.get("round")][-1:]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([*kept, dict(record)]))
    os.replace(tmp, path)


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if isinstance(records, dict):
        records = [records]
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def load_pending(run_dir: Path, rnd: int) -> dict[str, Any]:
    """The train half of round ``rnd`` if it was kept, else a record with the round only."""
    for record in _read(run_dir / PENDING):
        if record.get("round") == rnd:
            return record
    return {"round": rnd}
