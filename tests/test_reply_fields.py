"""Every field a DP client sends is DP-protected or public (fedtune/messages.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import RecordDict

from fedtune.config import parse_run_config
from fedtune.messages import EVALUATE_FIELDS, STATUSES, TRAIN_FIELDS, check_reply
from fedtune.node.round import train_reply
from fedtune.train import TrainResult
from fedtune.train.runtime import ClientRuntime, TrainOutcome


def _fields(content: RecordDict) -> set[tuple[str, str]]:
    out = set()
    for name, record in {**content.config_records, **content.metric_records}.items():
        out |= {(name, key) for key in record}
    return out


def _runtime(model: Path, data: Path, tmp_path: Path, dp: str) -> ClientRuntime:
    cfg = parse_run_config(
        {
            "model-path": str(model),
            "data-path": str(data),
            "num-clients": 2,
            "batch-size": 8,
            "label-names": "animal,food,tool",
            "dp": dp,
            "noise-multiplier": 2.0,
        }
    )
    return ClientRuntime(cfg, partition_id=0, num_partitions=2, privacy_dir=tmp_path)


def test_every_declared_field_has_a_known_status() -> None:
    for schema in (TRAIN_FIELDS, EVALUATE_FIELDS):
        assert set(schema.values()) <= set(STATUSES)


def test_a_dp_clients_train_reply_holds_only_protected_or_public_fields(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, "example")
    reply = train_reply(runtime, runtime.train(None, server_round=1))
    fields = _fields(reply)
    # the whole list, so that a new field fails this test until it is declared
    assert fields == {
        ("update", "chunks"),
        ("update", "length"),
        ("update", "fingerprint"),
        ("info", "client"),
        ("info", "declined"),
        ("metrics", "num-examples"),
        ("metrics", "epsilon"),
        ("metrics", "partition-id"),
    }
    assert {TRAIN_FIELDS[f] for f in fields} <= {"dp", "public"}


def test_without_dp_the_training_statistics_are_sent(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, "off")
    fields = _fields(train_reply(runtime, runtime.train(None, server_round=1)))
    assert {("metrics", "train-loss"), ("metrics", "train-seconds")} <= fields


def test_a_dp_reply_with_a_training_statistic_is_stopped_before_it_leaves(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, "example")
    outcome = runtime.train(None, server_round=1)
    leaky = TrainOutcome(
        payload=outcome.payload,
        num_examples=outcome.num_examples,
        result=TrainResult(loss=0.5, steps=6, num_examples=48, seconds=1.0),
        epsilon=outcome.epsilon,
    )
    assert "train-loss" not in str(_fields(train_reply(runtime, leaky)))  # dropped under DP
    with pytest.raises(ValueError, match=r"train reply field metrics.train-loss is an unprotected"):
        check_reply({"metrics": {"train-loss": 0.5}}, phase="train", private=True)
    with pytest.raises(ValueError, match=r"metrics.grad-norm has no declared privacy status"):
        check_reply({"metrics": {"grad-norm": 0.5}}, phase="train", private=False)
