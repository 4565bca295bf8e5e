"""One resolve per party, one model per process (issue 30), counted in a tiny simulated run.

``fedtune simulate``'s driver runs here with Flower's simulation engine swapped for an
in-process grid (every party in this one process, no Ray): the driver, the ServerApp
and each ClientApp handle their messages as they do under Ray. Counters on
``parse_run_config`` and ``build_model`` record which party called them.
"""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.supercore.task_identity import TaskIdentity

import fedtune.apps.client.app
import fedtune.apps.server.app
import fedtune.run.export
import fedtune.tasks.classification
from fedtune.apps.simulation import driver
from fedtune.apps.simulation.in_process import run_in_process
from fedtune.config import parse
from fedtune.model import lora
from fedtune.node import round as node_round
from fedtune.train.shared import clear_worker_cache

#: The module a call is attributed to, by the first frame of one of these.
PARTIES = (
    ("fedtune.node.round", "client"),
    ("fedtune.apps.server", "server"),
    ("fedtune.apps.simulation", "driver"),
)


def _party() -> str:
    for frame in inspect.stack()[2:]:
        module = frame.frame.f_globals.get("__name__", "")
        for prefix, party in PARTIES:
            if module.startswith(prefix):
                name = frame.frame.f_locals.get("name")
                return f"client {name}" if party == "client" else party
    return "other"


def _count(monkeypatch: pytest.MonkeyPatch, original: Callable[..., Any]) -> Counter[str]:
    """Replace every module-level binding of ``original`` by a counting wrapper."""
    calls: Counter[str] = Counter()

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[_party()] += 1
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("fedtune"):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                monkeypatch.setattr(module, attr, counted)
    return calls


def test_each_party_parses_once_and_the_process_builds_one_model(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    assert fedtune.apps.client.app and fedtune.apps.server.app and fedtune.run.export
    assert fedtune.tasks.classification  # imported: their bindings are counted too
    clear_worker_cache()
    monkeypatch.setattr(node_round, "_RUNTIMES", {})
    parses = _count(monkeypatch, parse.parse_run_config)
    builds = _count(monkeypatch, lora.build_model)
    monkeypatch.setattr("flwr.simulation.run_simulation", run_in_process)
    flat = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "num-clients": 3,
        "num-rounds": 2,
        "batch-size": 8,
    }
    result = driver.simulate(flat, run_dir=tmp_path / "run")
    assert [r["round"] for r in result.records] == [0, 1, 2]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    clients = {f"client client-{k}": 1 for k in range(3)}
    assert dict(parses) == {"driver": 1, "server": 1, **clients}, parses
    # One model in this process: the preflight's, shared by the server's length, the
    # clients (the worker's model) and the export.
    assert sum(builds.values()) == 1, builds
    assert builds["driver"] == 1, builds


def test_the_server_reads_the_adapter_length_instead_of_building_a_model(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    from fedtune.apps.server.context import ADAPTER_LENGTH, resolve_server
    from fedtune.config import ConfigError

    builds = _count(monkeypatch, lora.build_model)
    flat = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "label-names": "animal,food,tool",
        "run-dir": str(tmp_path / "run"),
    }
    run = resolve_server({**flat, ADAPTER_LENGTH: 1234}, run_id=1)
    assert run.codec.length == 1234 and not builds  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="`adapter-length` must be a positive integer"):
        resolve_server({**flat, ADAPTER_LENGTH: "-3"}, run_id=1)
    measured = resolve_server(flat, run_id=1)  # flwr run / a deployment: it measures
    assert builds["server"] == 1 and measured.codec.length > 0  # type: ignore[attr-defined]
