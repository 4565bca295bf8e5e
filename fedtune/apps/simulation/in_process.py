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

from flwr.app import Context, Message, RecordDict

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


def _node(client_app: Any, context: Context) -> Handler:
    def handle(msg: Message) -> Message:
        reply: Message = client_app(msg, context)
        return reply

    return handle


def run_in_process(*, server_app: Any, client_app: Any, num_supernodes: int, **_: Any) -> None:
    """Flower's ``run_simulation``, every node in this process."""
    nodes: dict[int, Handler] = {}
    for k in range(num_supernodes):
        config: dict[str, bool | float | int | str] = {
            "partition-id": k,
            "num-partitions": num_supernodes,
        }
        context = Context(
            run_id=1, node_id=k + 1, node_config=config, state=RecordDict(), run_config={}
        )
        nodes[k + 1] = _node(client_app, context)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app(InProcessGrid(nodes), server)
