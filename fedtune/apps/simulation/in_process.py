"""Every party of a simulated federation in this process, one message at a time (no Ray).

For comparisons and tests, never for a run whose speed or isolation matters:
:class:`InProcessGrid` is Flower's ``Grid`` as fedtune's server loop uses it
(:func:`~fedtune.apps.server.exchange.exchange`), answering each message by calling the
destination node's handler; :func:`run_in_process` stands in for Flower's
``run_simulation`` (``scripts/simulate_in_process.py``, ``tests/test_run_counts.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict

__all__ = ["InProcessGrid", "run_in_process"]

#: A node: one message in, its reply out.
Handler = Callable[[Message], Message]


class InProcessGrid:
    """Flower's Grid, as :func:`~fedtune.apps.server.exchange.exchange` uses it, in process."""

    def __init__(self, nodes: dict[int, Handler]) -> None:
        self.nodes = nodes
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self._replies[mid] = self.nodes[msg.metadata.dst_node_id](msg)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Any) -> list[Message]:
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]


def _node(
    client_app: Any,
    context: Context,
    *,
    errors_as_replies: bool,
    drop: Callable[[int, Message], bool] | None,
) -> Handler:
    def handle(msg: Message) -> Message:
        if drop is not None and drop(int(context.node_id), msg):
            return Message(Error(code=2, reason="node gone"), reply_to=msg)
        if not errors_as_replies:
            reply: Message = client_app(msg, context)
            return reply
        try:
            return client_app(msg, context)  # type: ignore[no-any-return]
        except Exception as err:  # noqa: BLE001 - what Flower does with it
            return Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=msg)

    return handle


def run_in_process(
    *,
    server_app: Any,
    client_app: Any,
    num_supernodes: int,
    errors_as_replies: bool = False,
    drop: Callable[[int, Message], bool] | None = None,
    grids: list[InProcessGrid] | None = None,
    **_: Any,
) -> None:
    """Flower's ``run_simulation``, every node in this process.

    ``errors_as_replies``: a ClientApp exception becomes an error reply, as Flower sends
    it (by default it propagates); ``drop(node_id, msg)`` selects messages that get an
    error reply instead of an answer (a node that is gone); ``grids`` collects the grid.
    """
    nodes: dict[int, Handler] = {}
    for k in range(num_supernodes):
        config: dict[str, bool | float | int | str] = {
            "partition-id": k,
            "num-partitions": num_supernodes,
        }
        context = Context(
            run_id=1, node_id=k + 1, node_config=config, state=RecordDict(), run_config={}
        )
        nodes[k + 1] = _node(client_app, context, errors_as_replies=errors_as_replies, drop=drop)
    grid = InProcessGrid(nodes)
    if grids is not None:
        grids.append(grid)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app(grid, server)
