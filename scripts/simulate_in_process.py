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

import flwr.simulation
from flwr.supercore.task_identity import TaskIdentity

from fedtune.apps.simulation.driver import simulate
from fedtune.apps.simulation.in_process import run_in_process
from fedtune.privacy import releases


def main(argv: list[str]) -> None:
    """Simulate ``KEY=VALUE`` overrides into ``RUN_DIR``."""
    if not argv or argv[0].startswith("-") or any("=" not in a for a in argv[1:]):
        raise SystemExit(
            "usage: PYTHONHASHSEED=0 python scripts/simulate_in_process.py RUN_DIR KEY=VALUE..."
        )
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    flwr.simulation.run_simulation = run_in_process  # type: ignore[assignment]
    counter = itertools.count()
    releases.secrets = types.SimpleNamespace(  # type: ignore[assignment]
        token_hex=lambda k: f"{next(counter):0{2 * k}x}", randbits=secrets.randbits
    )
    flat = dict(arg.split("=", 1) for arg in argv[1:])
    result = simulate(flat, run_dir=Path(argv[0]))
    print("rounds", [r["round"] for r in result.records], "adapter", result.adapter_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
