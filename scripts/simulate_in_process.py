"""Run ``fedtune simulate``'s driver with every party in this process (no Ray), for comparisons.

    PYTHONHASHSEED=0 PYTHONPATH=TREE python scripts/simulate_in_process.py RUN_DIR KEY=VALUE...

Flower's simulation engine is swapped for an in-process grid (as
``tests/test_run_counts.py`` does): the driver, the ServerApp and each ClientApp
run as under ``fedtune simulate``, one message at a time. Each client's run nonce,
random by design, is drawn from a counter instead, so two runs of the same seeded
config (``seeded-noise = true`` with DP on) are byte-for-byte comparable with
``scripts/compare_runs.py``. For comparisons only: never for a run whose privacy matters.
"""

from __future__ import annotations

import itertools
import secrets
import sys
import types
from pathlib import Path
from typing import Any

import flwr.simulation
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.apps.simulation.driver import simulate
from fedtune.privacy import releases


class InProcessGrid:
    """Flower's Grid, as fedtune's server loop uses it, answering in process."""

    def __init__(self, nodes: dict[int, Any]) -> None:
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


def run_simulation(*, server_app: Any, client_app: Any, num_supernodes: int, **_: Any) -> None:
    """Flower's ``run_simulation``, every node in this process."""
    nodes = {}
    for k in range(num_supernodes):
        config = {"partition-id": k, "num-partitions": num_supernodes}
        context = Context(
            run_id=1, node_id=k + 1, node_config=config, state=RecordDict(), run_config={}
        )
        nodes[k + 1] = lambda msg, c=context: client_app(msg, c)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app(InProcessGrid(nodes), server)


def main(argv: list[str]) -> None:
    """Simulate ``KEY=VALUE`` overrides into ``RUN_DIR``."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    flwr.simulation.run_simulation = run_simulation  # type: ignore[assignment]
    counter = itertools.count()
    releases.secrets = types.SimpleNamespace(  # type: ignore[assignment]
        token_hex=lambda k: f"{next(counter):0{2 * k}x}", randbits=secrets.randbits
    )
    flat = dict(arg.split("=", 1) for arg in argv[1:])
    result = simulate(flat, run_dir=Path(argv[0]))
    print("rounds", [r["round"] for r in result.records], "adapter", result.adapter_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
