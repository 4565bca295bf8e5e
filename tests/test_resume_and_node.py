"""Server resume from its checkpoint, seeded sampling, and a node's own settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedtune.apps.server.app import resume_round
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.errors import FederationError
from fedtune.node.round import node_settings
from fedtune.run.checkpoint import Checkpoint, save_checkpoint
from fedtune.secure.plain import PlainCodec


def _strategy(codec: PlainCodec, seed: int = 0) -> FedTuneStrategy:
    return FedTuneStrategy(
        codec=codec, fraction_train=0.5, fraction_evaluate=1.0, min_clients=1, seed=seed
    )


def _records(path: Path, rounds: range) -> None:
    path.write_text(
        "".join(json.dumps({"round": r, "eval-accuracy": r / 10}) + "\n" for r in rounds)
    )


def test_new_run_starts_at_round_one_and_clears_old_metrics(tmp_path: Path) -> None:
    _records(tmp_path / "metrics.jsonl", range(3))
    assert resume_round(tmp_path, _strategy(PlainCodec(length=2)), resume=False) == 1
    assert not (tmp_path / "metrics.jsonl").exists()


def test_new_run_refuses_a_run_dir_with_a_checkpoint(tmp_path: Path) -> None:
    codec = PlainCodec(length=2)
    save_checkpoint(
        tmp_path / "checkpoint", Checkpoint(2, codec.encode(np.ones(2)), num_examples=3)
    )
    with pytest.raises(FederationError, match="already holds a checkpoint; resume it"):
        resume_round(tmp_path, _strategy(codec), resume=False)


def test_resume_loads_the_checkpoint_and_drops_later_metrics(tmp_path: Path) -> None:
    codec = PlainCodec(length=2)
    save_checkpoint(tmp_path / "checkpoint", Checkpoint(2, codec.encode(np.array([3.0, 6.0])), 3))
    _records(tmp_path / "metrics.jsonl", range(4))  # round 3 was half done when it died
    strategy = _strategy(codec)
    assert resume_round(tmp_path, strategy, resume=True) == 3
    assert strategy.global_payload is not None and strategy.global_examples == 3
    np.testing.assert_allclose(codec.decode(strategy.global_payload) / 3, [1.0, 2.0])
    rounds = [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Round 2's own line is written again by the resumed run, with its evaluation.
    assert rounds == [0, 1]


def test_resume_rejects_a_checkpoint_of_another_shape(tmp_path: Path) -> None:
    save_checkpoint(
        tmp_path / "checkpoint", Checkpoint(1, PlainCodec(length=5).encode(np.ones(5)), 1)
    )
    with pytest.raises(FederationError, match="does not fit this run"):
        resume_round(tmp_path, _strategy(PlainCodec(length=2)), resume=True)


def test_resume_without_checkpoint_says_so(tmp_path: Path) -> None:
    from fedtune.errors import CheckpointError

    with pytest.raises(CheckpointError, match="No checkpoint"):
        resume_round(tmp_path, _strategy(PlainCodec(length=2)), resume=True)


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_sampling_depends_on_seed_and_round_only() -> None:
    grid = _Grid([11, 22, 33, 44, 55, 66])
    first = _strategy(PlainCodec(length=1), seed=7)
    picks = [first._sample(grid, 0.5, r, 0) for r in (1, 2, 3)]  # type: ignore[arg-type]
    resumed = _strategy(PlainCodec(length=1), seed=7)  # a restarted server, straight to round 3
    assert resumed._sample(grid, 0.5, 3, 0) == picks[2]  # type: ignore[arg-type]
    assert len({tuple(p) for p in picks}) > 1, "rounds must not all sample the same clients"


def test_node_settings_take_the_nodes_own_files() -> None:
    run = {"num-rounds": 3, "data-path": "/server/says/this.csv", "secret-context": "/x"}
    node = {"data-path": "/node/a.csv", "state-dir": "/node/state", "secret-context": "/node/s"}
    merged = node_settings(run, node, deployed=True)
    assert merged["data-path"] == "/node/a.csv"
    assert merged["secret-context"] == "/node/s"
    assert (merged["partition-id"], merged["num-partitions"]) == (0, 1)
    assert merged["name"] == "client-0"
    named = node_settings(run, {**node, "name": "hospital-a"}, deployed=True)
    assert named["name"] == "hospital-a"


def test_deployed_node_never_takes_file_paths_from_the_run_config() -> None:
    run = {"data-path": "/other/node.csv", "secret-context": "/x", "state-dir": "/y"}
    merged = node_settings(run, {"partition-id": 1, "num-partitions": 3}, deployed=True)
    assert "data-path" not in merged and "secret-context" not in merged
    assert "state-dir" not in merged
    assert merged["name"] == "client-1"


def test_node_settings_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="Unknown node-config key"):
        node_settings({}, {"partition-id": 0, "num-partitions": 1, "colour": "red"}, deployed=True)
    with pytest.raises(ValueError, match="needs `partition-id`"):
        node_settings({}, {"state-dir": "/s"}, deployed=True)
