"""What the simulation driver changes about Flower 1.41's simulation engine, for one run.

:func:`flower_patches` swaps in :func:`poll_pending_nodes` (the engine's message loop,
asking only the nodes with a message) and, while nodes register,
:func:`seeded_node_ids` (node ids from the run's seed, so the same seed samples the same
partitions). Both are undone when the run ends.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

__all__ = ["flower_patches", "poll_pending_nodes", "seeded_node_ids"]


def poll_pending_nodes(original: Any) -> Any:
    """Flower's ``add_messages_to_queue``, asking only the nodes that have a message.

    Flower 1.41's simulation runtime asks *every* virtual node for its messages ten
    times a second, and each ask checks every stored message
    (``InMemoryLinkState.get_message_ins``): with 1000 nodes and 100 messages in
    flight that is a million checks a second in the driver, which took a core from
    the clients and made a round of 1000 clients cost 1.5 times the same work on 50.
    This asks, in the same order, only the nodes with an undelivered message (a look
    at the state's store under its lock), so the cost grows with the messages in a
    round, not with the federation. Any other state falls back to Flower's loop.
    """

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        store = getattr(state, "message_ins_store", None)
        lock = getattr(state, "lock", None)
        if not isinstance(store, dict) or lock is None:
            original(state, queue, nodes_mapping, f_stop)
            return
        nodes = list(nodes_mapping.keys())
        while not f_stop.is_set():
            with lock:
                pending = {
                    m.metadata.dst_node_id for m in store.values() if not m.metadata.delivered_at
                }
            if pending:
                for node_id in [n for n in nodes if n in pending]:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            f_stop.wait(0.1)

    return add_messages_to_queue


def seeded_node_ids(seed: int) -> Any:
    """Flower's ``generate_rand_int_from_bytes``, drawn from a generator seeded by ``seed``.

    Flower 1.41 gives simulated nodes random ids (``secrets``) and maps the i-th node
    created to partition i. The strategy samples positions among the sorted node ids,
    so with random ids a run that samples fewer than all clients trained other
    partitions each time it ran: the same seed did not give the same run. Used only
    while the nodes are registered.
    """
    rng = random.Random(f"fedtune-simulated-node-ids/{seed}")

    def generate(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            value = rng.getrandbits(8 * num_bytes)
            if value and value not in (exclude or set()):
                return value

    return generate


@contextlib.contextmanager
def flower_patches(seed: int) -> Any:
    """For one run: :func:`poll_pending_nodes`, and node ids from :func:`seeded_node_ids`."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import in_memory_linkstate

    original_poll = vce_api.add_messages_to_queue
    original_register = vce_api._register_nodes  # noqa: SLF001

    def register_nodes(*args: Any, **kwargs: Any) -> Any:
        random_ids = in_memory_linkstate.generate_rand_int_from_bytes
        in_memory_linkstate.generate_rand_int_from_bytes = seeded_node_ids(seed)
        try:
            return original_register(*args, **kwargs)
        finally:
            in_memory_linkstate.generate_rand_int_from_bytes = random_ids

    vce_api.add_messages_to_queue = poll_pending_nodes(original_poll)
    vce_api._register_nodes = register_nodes  # noqa: SLF001
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original_poll
        vce_api._register_nodes = original_register  # noqa: SLF001
