"""DP on the client: releases keyed by the client, budgets enforced, nothing unaccounted."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import ConfigError, parse_run_config
from fedtune.privacy import PrivacyLedger, compute_epsilon
from fedtune.privacy.policy import NodePolicy
from fedtune.resolve import resolve
from fedtune.train.plan import privacy_plan
from fedtune.train.runtime import ClientRuntime, GlobalState

RO = {"relation": "replace-one"}


def _cfg(model: Path, data: Path, **extra: object):  # type: ignore[no-untyped-def]
    return resolve(
        {
            "model-path": str(model),
            "data-path": str(data),
            "num-clients": 2,
            "batch-size": 8,
            "label-names": "animal,food,tool",
            "num-rounds": 3,
            "dp": "example",
            **extra,
        },
        wiring=False,
    ).config


def _runtime(
    model: Path, data: Path, privacy_dir: Path, *, run_id: str = "r1", **extra: object
) -> ClientRuntime:
    secret = extra.pop("secret_context", None)
    cfg = _cfg(model, data, **extra)
    return ClientRuntime(
        cfg,
        # A large movement slack: these tests send globals far from the initial adapter
        # and are about the ledger, not the movement guard (tests/test_movement.py).
        policy=replace(NodePolicy.from_run_config(cfg), max_step_slack=1e6),
        partition_id=0,
        num_partitions=2,
        privacy_dir=privacy_dir,
        run_id=run_id,
        secret_context=secret,  # type: ignore[arg-type]
    )


def _global(runtime: ClientRuntime, value: float) -> GlobalState:
    """A global sum from two clients whose mean adapter is ``value`` everywhere."""
    vec = np.full(runtime.initial.size, value)
    return GlobalState(payload=runtime.codec.encode(2 * vec), num_examples=2)


def test_each_round_is_in_the_ledger_once_and_composes(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, **{"target-epsilon": 4.0})
    plan = runtime.plan
    assert plan.sample_rate == pytest.approx(8 / 48) and plan.steps == int(48 / 8)
    first = runtime.train(None, server_round=1)
    state = _global(runtime, 0.01)
    second = runtime.train(state, server_round=2)
    retried = runtime.train(state, server_round=2)  # e.g. a message resent after a timeout
    assert retried.replayed and retried.epsilon == second.epsilon
    assert retried.payload == second.payload  # the stored reply, verbatim: no new noise
    records = PrivacyLedger(tmp_path / "client-0.jsonl").records()
    assert [r.round for r in records] == [1, 2]
    assert (records[0].batch_size, records[0].local_epochs, records[0].num_examples) == (8, 1, 48)
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 2
    expected = compute_epsilon(history, delta=1e-5, accountant="discrete-rdp", **RO)
    assert second.epsilon == pytest.approx(expected, rel=1e-9)
    assert first.epsilon is not None and first.epsilon < second.epsilon < 4.0


def test_a_resent_round_with_another_global_state_is_refused(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before the fix the ledger key was (run-id, round, client): the second call trained
    # again, released a new update and appended nothing.
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, **{"noise-multiplier": 2.0})
    runtime.train(None, server_round=1)
    assert runtime.train(_global(runtime, 0.01), server_round=2).payload is not None
    with caplog.at_level("WARNING", logger="fedtune.client"):
        # The same global adapter (the movement guard accepts it again) in another input:
        # another sampled-client count, part of what a release is keyed by.
        probe = runtime.train(_global(runtime, 0.01), server_round=2, sampled_clients=3)
    assert probe.payload is None and probe.declined == "round-already-released"
    assert "already released from another global state" in caplog.text  # the node's log only
    assert len(PrivacyLedger(tmp_path / "client-0.jsonl").records()) == 2


def test_a_second_run_with_the_same_run_id_is_a_new_counted_release(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # Same run-id and privacy dir (a node's state dir), another configuration: the client
    # sees another run, makes a new nonce, and composes with what the data already spent.
    first = _runtime(tiny_model_dir, toy_csv, tmp_path, **{"noise-multiplier": 2.0})
    eps1 = first.train(None, server_round=1).epsilon
    second = _runtime(
        tiny_model_dir, toy_csv, tmp_path, **{"noise-multiplier": 2.0, "learning-rate": 0.01}
    )
    eps2 = second.train(None, server_round=1).epsilon
    records = PrivacyLedger(tmp_path / "client-0.jsonl").records()
    assert len(records) == 2 and records[0].run_nonce != records[1].run_nonce
    assert eps1 is not None and eps2 is not None and eps2 > eps1


def test_noise_differs_between_releases(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # Before the fix the noise seed was (secret, seed, round, name): two releases of one
    # round carried the same noise, and their difference was almost noise-free.
    a = _runtime(tiny_model_dir, toy_csv, tmp_path / "a", **{"noise-multiplier": 2.0})
    b = _runtime(tiny_model_dir, toy_csv, tmp_path / "b", **{"noise-multiplier": 2.0})
    ua = a.codec.decode(a.train(None, server_round=1).payload)  # type: ignore[arg-type]
    ub = b.codec.decode(b.train(None, server_round=1).payload)  # type: ignore[arg-type]
    assert np.max(np.abs(ua - ub)) > 1e-3


def test_seeded_noise_reproduces_and_is_recorded(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    extra = {"noise-multiplier": 2.0, "seeded-noise": True}
    a = _runtime(tiny_model_dir, toy_csv, tmp_path / "a", **extra)
    b = _runtime(tiny_model_dir, toy_csv, tmp_path / "b", **extra)
    # distinct nonces, so distinct seeds: reproducible only through the stored reply
    ra, rb = a.train(None, server_round=1), b.train(None, server_round=1)
    assert ra.payload != rb.payload
    (record,) = PrivacyLedger(tmp_path / "a" / "client-0.jsonl").records()
    assert record.noise == "seeded"


def test_client_declines_a_round_over_its_budget(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # sigma fixed by hand; budget below what even one round costs
    runtime = _runtime(
        tiny_model_dir, toy_csv, tmp_path, **{"noise-multiplier": 0.8, "epsilon-budget": 0.5}
    )
    with caplog.at_level("WARNING", logger="fedtune.client"):
        outcome = runtime.train(None, server_round=1)
    assert outcome.payload is None and outcome.num_examples == 0
    assert outcome.declined == "budget-spent"  # a code; the numbers stay in the node's log
    assert "privacy budget: round 1 would take epsilon from 0.000 to" in caplog.text
    assert "over the budget 0.5" in caplog.text
    assert not (tmp_path / "client-0.jsonl").exists()  # nothing spent


@pytest.fixture(scope="module")
def secret_ctx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedtune import crypto

    out = tmp_path_factory.mktemp("ckks")
    crypto.save_keys(crypto.make_secret_context(), out)
    return out / "secret.ctx"


def test_client_level_dp_clips_and_sizes_its_share_for_the_tolerance(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, secret_ctx: Path
) -> None:
    runtime = _runtime(
        tiny_model_dir,
        toy_csv,
        tmp_path,
        dp="client",
        encryption=True,
        secret_context=secret_ctx,
        **{"noise-multiplier": 2.0, "max-grad-norm": 0.01, "num-clients": 4},
    )
    start = runtime.global_vector(None, server_round=0)
    outcome = runtime.train(None, server_round=1, sampled_clients=4)
    assert outcome.num_examples == 1  # uniform weights under client-level DP
    update = runtime.codec.decode(outcome.payload) - start  # type: ignore[arg-type]
    # clipped to C = 0.01 plus a share of std σC/sqrt(m - t) = 0.02/sqrt(3): the noise
    # dominates, and its std says which m and t it was sized for
    assert np.std(update) == pytest.approx(0.02 / np.sqrt(3), rel=0.05)
    record = json.loads((tmp_path / "client-0.jsonl").read_text().splitlines()[0])
    assert (record["level"], record["steps"], record["sample_rate"]) == ("client", 1, 1.0)
    assert (record["sampled_clients"], record["tolerance"]) == (4, 1)
    # one unamplified step at q = 1 (before the fix: q = m / N), discrete noise: proven ε
    assert record["epsilon"] == pytest.approx(
        compute_epsilon([(2.0, 1.0, 1)], delta=1e-5, accountant="discrete-rdp", **RO)
    )


@pytest.mark.parametrize("sampled", [0, 1, 5])
def test_client_level_declines_a_sampled_count_its_shares_cannot_cover(
    tiny_model_dir: Path,
    toy_csv: Path,
    tmp_path: Path,
    secret_ctx: Path,
    sampled: int,
    *,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = _runtime(
        tiny_model_dir,
        toy_csv,
        tmp_path,
        dp="client",
        encryption=True,
        secret_context=secret_ctx,
        **{"noise-multiplier": 1.0, "num-clients": 4},
    )
    with caplog.at_level("WARNING", logger="fedtune.client"):
        outcome = runtime.train(None, server_round=1, sampled_clients=sampled)
    assert outcome.payload is None and outcome.declined == "dp-level-refused"
    assert "noise shares need between 2 and the planned 4" in caplog.text


def test_client_level_dp_without_encryption_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"`dp` = 'client' needs `encryption` = true"):
        parse_run_config({"dp": "client", "encryption": False})


def test_dp_with_own_data_needs_label_names(tiny_model_dir: Path, toy_csv: Path) -> None:
    with pytest.raises(ConfigError, match=r"`label-names` must list the labels when DP is on"):
        _cfg(tiny_model_dir, toy_csv, **{"label-names": ""})


def test_empty_poisson_batch_still_takes_a_noisy_step(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch-size 1 of 48: q = 1/48, so P(empty batch) = (47/48)^48 = 0.36 per step. Before
    # the fix an empty batch was skipped: fewer noisy steps than the ledger counted.
    from fedtune.privacy import discrete_array

    draws: list[int] = []
    real = discrete_array.discrete_gaussian_array  # DP-SGD's noise (fedtune.privacy.optimizer)

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        draws.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(discrete_array, "discrete_gaussian_array", counting)
    runtime = _runtime(
        tiny_model_dir, toy_csv, tmp_path, **{"noise-multiplier": 1.0, "batch-size": 1}
    )
    runtime.train(None, server_round=1)
    (record,) = PrivacyLedger(tmp_path / "client-0.jsonl").records()
    assert record.steps == 48
    assert len(draws) == 48  # one noise draw per Poisson batch, empty ones included


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


def test_plan_for_client_level_is_one_unamplified_step() -> None:
    cfg = parse_run_config(
        {
            "dp": "client",
            "encryption": True,
            "num-clients": 10,
            "fraction-train": 0.3,
            "min-clients": 2,
            "noise-multiplier": 1.0,
        }
    )
    plan = privacy_plan(cfg, num_train_examples=100)
    assert (plan.sampled_clients, plan.sample_rate, plan.steps, plan.tolerance) == (3, 1.0, 1, 1)
