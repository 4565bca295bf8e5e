"""DP on the client: ledger per round, retried rounds counted once, budgets enforced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedtune.client import ClientRuntime, privacy_plan, round_seed
from fedtune.config import ConfigError, parse_run_config
from fedtune.privacy import PrivacyLedger, compute_epsilon, distributed_noise


def _runtime(model: Path, data: Path, privacy_dir: Path, **extra: object) -> ClientRuntime:
    cfg = parse_run_config(
        {
            "model-path": str(model),
            "data-path": str(data),
            "num-clients": 2,
            "batch-size": 8,
            "label-names": "animal,food,tool",
            "num-rounds": 3,
            "dp": "example",
            **extra,
        }
    )
    return ClientRuntime(
        cfg, partition_id=0, num_partitions=2, privacy_dir=privacy_dir, run_id="r1"
    )


def test_each_round_is_in_the_ledger_once_and_composes(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, **{"target-epsilon": 4.0})
    plan = runtime.plan
    assert plan.sample_rate == pytest.approx(8 / 48) and plan.steps == int(48 / 8)
    eps = [runtime.train(None, server_round=r).epsilon for r in (1, 2)]
    retried = runtime.train(None, server_round=2)  # e.g. a resumed round
    assert retried.epsilon == eps[1]
    records = PrivacyLedger(tmp_path / "client-0.jsonl").records()
    assert [r.round for r in records] == [1, 2]
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 2
    assert eps[1] == pytest.approx(compute_epsilon(history, delta=1e-5, accountant="prv"), rel=1e-9)
    assert eps[0] < eps[1] < 4.0


def test_calibration_spends_exactly_the_target_over_the_planned_rounds(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, **{"target-epsilon": 2.0})
    last = [runtime.train(None, server_round=r).epsilon for r in (1, 2, 3)][-1]
    assert last is not None and 1.9 <= last <= 2.0


def test_client_declines_a_round_over_its_budget(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # sigma fixed by hand; budget below what even one round costs
    runtime = _runtime(
        tiny_model_dir, toy_csv, tmp_path, **{"noise-multiplier": 0.8, "epsilon-budget": 0.5}
    )
    outcome = runtime.train(None, server_round=1)
    assert outcome.payload is None and outcome.num_examples == 0
    assert "privacy budget: round 1 would take epsilon from 0.000 to" in outcome.declined
    assert "over the budget 0.5" in outcome.declined
    assert not (tmp_path / "client-0.jsonl").exists()  # nothing spent


def test_client_level_dp_clips_and_weights_uniformly(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(
        tiny_model_dir,
        toy_csv,
        tmp_path,
        dp="client",
        **{"noise-multiplier": 1.0, "max-grad-norm": 0.01},
    )
    start = runtime.global_vector(None)
    outcome = runtime.train(None, server_round=1)
    assert outcome.num_examples == 1  # uniform weights: n_k would leak through the sum
    update = runtime.codec.decode(outcome.payload) - start
    # This client's share of the noise: std sigma * C / sqrt(m) with m = 2 sampled clients.
    noise = distributed_noise(
        update.shape,
        noise_multiplier=1.0,
        clip_norm=0.01,
        num_sampled_clients=2,
        generator=np.random.default_rng(round_seed(42, 1, 0)),
    )
    assert np.std(noise) == pytest.approx(0.01 / np.sqrt(2), rel=0.05)
    assert np.linalg.norm(update - noise) == pytest.approx(0.01, rel=1e-6)  # clipped to C
    record = json.loads((tmp_path / "client-0.jsonl").read_text().splitlines()[0])
    assert record["level"] == "client" and record["steps"] == 1 and record["sample_rate"] == 1.0


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"target-epsilon": 0}, r"`target-epsilon` must be > 0, got 0\.0"),
        ({"target-epsilon": -1}, r"`target-epsilon` must be > 0, got -1\.0"),
        ({"target-delta": 0}, r"`target-delta` must be in \(0, 1\), got 0\.0"),
        ({"target-delta": 1}, r"`target-delta` must be in \(0, 1\), got 1\.0"),
        ({"max-grad-norm": 0}, r"`max-grad-norm` must be > 0, got 0\.0"),
        ({"dp": "user"}, r"`dp` must be one of off, example, client, got 'user'"),
        ({"accountant": "gdp"}, r"`accountant` must be one of prv, rdp, got 'gdp'"),
    ],
)
def test_bad_privacy_values(values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config(values)


def test_plan_for_client_level_uses_sampled_fraction() -> None:
    cfg = parse_run_config(
        {
            "dp": "client",
            "num-clients": 10,
            "fraction-train": 0.3,
            "min-clients": 2,
            "noise-multiplier": 1.0,
        }
    )
    plan = privacy_plan(cfg, num_train_examples=100)
    assert (plan.sampled_clients, plan.sample_rate, plan.steps) == (3, 0.3, 1)
