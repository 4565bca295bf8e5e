"""Held-out evaluation under the guarantee (issue 26, part B).

The attacks: a malicious server that asks a DP node for its held-out metrics every
round, asks again for the same state to average the noise away, changes the run seed
so that examples move between the held-out and the training split, or sets a tiny
``test-fraction`` so that one example's loss comes back to 7 digits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedtune import data as fdata
from fedtune.config import ConfigError, DataConfig, parse_run_config
from fedtune.messages import check_reply
from fedtune.node.round import evaluate as evaluate_message
from fedtune.privacy import PrivacyLedger, compute_epsilon
from fedtune.privacy.evaluation import (
    EXAMPLE_BOUNDS,
    clipped_sums,
    metric_std,
    release_metrics,
)
from fedtune.privacy.noise import SeededNoise
from fedtune.privacy.policy import NodePolicy
from fedtune.privacy.record import LedgerRecord
from fedtune.train.eval_release import DECLINE_EVAL_BUDGET, DECLINE_EVAL_ROUND
from fedtune.train.runtime import ClientRuntime, GlobalState

RO = {"relation": "replace-one"}


def _runtime(
    model: Path,
    data: Path,
    privacy_dir: Path,
    *,
    policy: NodePolicy | None = None,
    state_dir: Path | None = None,
    **extra: object,
) -> ClientRuntime:
    cfg = parse_run_config(
        {
            "model-path": str(model),
            "data-path": str(data),
            "num-clients": 2,
            "batch-size": 8,
            "label-names": "animal,food,tool",
            "num-rounds": 3,
            "dp": "example",
            "noise-multiplier": 1.0,
            **extra,
        }
    )
    return ClientRuntime(
        cfg,
        partition_id=0,
        num_partitions=2,
        privacy_dir=privacy_dir,
        run_id="r1",
        # A large movement slack: these tests send globals far from the initial adapter
        # and are about evaluation releases, not the movement guard (tests/test_movement.py).
        policy=policy
        or NodePolicy(eval_noise_multiplier=2.0, test_fraction=0.2, max_step_slack=1e6),
        state_dir=state_dir,
    )


def _global(runtime: ClientRuntime, value: float) -> GlobalState:
    vec = np.full(runtime.initial.size, value)
    return GlobalState(payload=runtime.codec.encode(2 * vec), num_examples=2)


def _ask(runtime: ClientRuntime, state: GlobalState | None, server_round: int) -> RecordDict:
    """What a server's evaluate message for round ``server_round``'s state gets back."""
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    if state is not None:
        content["global"] = ConfigRecord({**state.payload, "num-examples": state.num_examples})
    return evaluate_message(runtime, content)


def _metrics(reply: RecordDict) -> dict[str, float]:
    if "metrics" not in reply.metric_records:
        return {}
    return {k: float(v) for k, v in reply.metric_records["metrics"].items()}  # type: ignore[arg-type]


def _evals(ledger: Path) -> list[LedgerRecord]:
    return [r for r in PrivacyLedger(ledger).records() if r.kind != "train"]


# -- the node's replies ------------------------------------------------------------------


def test_a_dp_nodes_evaluation_is_noised_and_in_the_ledger(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # Before: the reply held the exact loss and accuracy, and the ledger stayed empty.
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path)
    exact = runtime.evaluate(None, server_round=0)
    got = _metrics(_ask(runtime, None, 0))
    assert got["num-examples"] == exact.num_examples == 12  # round(0.2 · 60)
    assert got["eval-loss"] != exact.loss  # a continuous value: noised
    assert 0.0 <= got["eval-accuracy"] <= 1.0 and 0.0 <= got["eval-loss"] <= 10.0
    (record,) = _evals(tmp_path / "client-0.jsonl")
    assert (record.kind, record.round, record.num_examples) == ("eval", 0, 12)
    assert (record.noise_multiplier, record.sample_rate, record.steps) == (2.0, 1.0, 1)
    assert record.max_grad_norm == pytest.approx(math.sqrt(2))  # two bounded sums
    assert record.noise == "csprng"
    assert record.epsilon == pytest.approx(
        compute_epsilon([(2.0, 1.0, 1)], delta=1e-5, accountant="prv", **RO), rel=1e-9
    )


def test_evaluation_releases_compose_with_training_in_one_history(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # σ = 2: at σ = 1 one grid round's proven ε (12.4) is over the default budget of 8
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, **{"noise-multiplier": 2.0})
    _ask(runtime, None, 0)
    trained = runtime.train(None, server_round=1)
    plan = runtime.plan
    expected = compute_epsilon(
        [(2.0, 1.0, 1), (plan.noise_multiplier, plan.sample_rate, plan.steps)],
        delta=1e-5,
        accountant="discrete-rdp",  # grid DP-SGD (the default dp-noise) in the history
        **RO,
    )
    assert trained.epsilon == pytest.approx(expected, rel=1e-9)
    ledger = PrivacyLedger(tmp_path / "client-0.jsonl")
    history = ledger.history(client="client-0", level="example")
    assert len(history.compositions) == 2
    from fedtune.privacy.audit import audit_records

    (audit,) = audit_records(ledger.records(), budget_epsilon=8.0, delta=1e-5).clients
    assert (audit.verdict, audit.rounds, audit.total_steps) == ("ok", 1, 1 + plan.steps), audit


def test_the_same_state_asked_again_gets_the_same_noisy_answer(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # The averaging attack: ask for one state's metrics many times (under the same or
    # other round numbers) and average the noise away. Each repeat replays the stored
    # answer and releases nothing new.
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path)
    state = _global(runtime, 0.01)
    first = _metrics(_ask(runtime, state, 2))
    again = [_metrics(_ask(runtime, state, 2)) for _ in range(3)]
    renamed = _metrics(_ask(runtime, state, 3))  # the same state, called round 3
    assert all(a == first for a in again) and renamed == first
    assert [r.round for r in _evals(tmp_path / "client-0.jsonl")] == [2]


def test_another_state_for_an_evaluated_round_is_declined(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path)
    _ask(runtime, _global(runtime, 0.01), 2)
    # Another state (another sum and count) with the same mean: the movement guard accepts
    # it as the round's global again, the evaluation release refuses a second state.
    vec = np.full(runtime.initial.size, 0.01)
    other = GlobalState(payload=runtime.codec.encode(4 * vec), num_examples=4)
    reply = _ask(runtime, other, 2)
    assert _metrics(reply) == {}
    assert reply.config_records["info"]["declined"] == DECLINE_EVAL_ROUND
    assert len(_evals(tmp_path / "client-0.jsonl")) == 1


def test_an_evaluation_over_the_budget_is_declined_without_metrics(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # Before: evaluations were unlimited. σ_eval = 0.5 is worth far more than ε = 0.5.
    runtime = _runtime(
        tiny_model_dir,
        toy_csv,
        tmp_path,
        policy=NodePolicy(eval_noise_multiplier=0.5, test_fraction=0.2),
        **{"target-epsilon": 0.5},
    )
    reply = _ask(runtime, None, 0)
    assert _metrics(reply) == {}
    assert reply.config_records["info"]["declined"] == DECLINE_EVAL_BUDGET
    assert "epsilon" not in DECLINE_EVAL_BUDGET and not any(
        c.isdigit() for c in DECLINE_EVAL_BUDGET
    )
    assert _evals(tmp_path / "client-0.jsonl") == []


def test_a_task_without_per_example_metrics_declines_a_dp_evaluation(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    from fedtune.train.eval_release import DECLINE_EVAL_TASK

    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path)
    inner = runtime.task

    class Older:  # a task written before per-example metrics existed
        eval_metrics = inner.eval_metrics
        evaluate = staticmethod(inner.evaluate)
        client_datasets = staticmethod(inner.client_datasets)

    runtime.task = Older()  # type: ignore[assignment]
    reply = _ask(runtime, None, 0)
    assert _metrics(reply) == {} and reply.config_records["info"]["declined"] == DECLINE_EVAL_TASK
    assert _evals(tmp_path / "client-0.jsonl") == []


def test_an_exact_opt_out_is_recorded_and_not_accounted(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    policy = NodePolicy(evaluation="exact", test_fraction=0.2)
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, policy=policy)
    exact = runtime.evaluate(None, server_round=0)
    got = _metrics(_ask(runtime, None, 0))
    assert (got["eval-loss"], got["eval-accuracy"]) == (exact.loss, exact.accuracy)
    ledger = PrivacyLedger(tmp_path / "client-0.jsonl")
    (record,) = ledger.records()
    assert (record.kind, record.noise_multiplier, record.accounted) == ("eval-exact", 0.0, False)
    assert ledger.history(client="client-0", level="example").compositions == ()
    from fedtune.privacy.audit import exact_evaluations

    assert exact_evaluations(ledger.records()) == {"client-0": [0]}
    runtime.train(None, server_round=1)
    from fedtune.privacy.audit import audit_records

    (audit,) = audit_records(ledger.records(), budget_epsilon=8.0, delta=1e-5).clients
    assert audit.verdict == "ok"
    assert any("exact held-out metrics sent outside the guarantee" in p for p in audit.problems)


def test_a_dp_nodes_evaluate_reply_declares_only_dp_or_public_fields(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune import messages

    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path)
    reply = _ask(runtime, None, 0)
    fields = {
        (n, k) for n, r in {**reply.config_records, **reply.metric_records}.items() for k in r
    }
    # the whole list, so that a new field fails this test until it is declared
    assert fields == {
        ("info", "client"),
        ("metrics", "num-examples"),
        ("metrics", "eval-loss"),
        ("metrics", "eval-accuracy"),
        ("metrics", "partition-id"),
    }
    content = {n: dict(r) for n, r in {**reply.config_records, **reply.metric_records}.items()}
    held = runtime.task.eval_metrics
    check_reply(content, phase="evaluate", private=True, held_out=held, evaluation="dp")
    # an exact held-out statistic declared later cannot ride along in a DP reply
    monkeypatch.setitem(messages.EVALUATE_FIELDS, ("metrics", "eval-raw-loss"), "held-out")
    check_reply({"metrics": {"eval-raw-loss": 0.5}}, phase="evaluate", private=True)
    with pytest.raises(ValueError, match=r"metrics.eval-raw-loss is an exact held-out statistic"):
        check_reply(
            {"metrics": {"eval-raw-loss": 0.5}}, phase="evaluate", private=True, evaluation="dp"
        )
    with pytest.raises(ValueError, match=r"`evaluation` must be one of \('dp', 'held-out'\)"):
        check_reply({}, phase="evaluate", private=True, evaluation="noisy")


# -- the held-out split ------------------------------------------------------------------


def test_the_held_out_split_does_not_move_with_the_run_seed(toy_csv: Path) -> None:
    # Before: client_split shuffled with the run seed, so a new seed moved examples that
    # were evaluated (exactly) into training and back.
    cfg = DataConfig(data_path=str(toy_csv), test_fraction=0.2)
    data = fdata.load_data(cfg, seed=0)
    a = fdata.client_data(data, cfg, partition_id=0, num_partitions=1, seed=1)
    b = fdata.client_data(data, cfg, partition_id=0, num_partitions=1, seed=2)
    assert len(a.test_texts) == round(0.2 * len(data))
    pairs = [sorted(zip(s.test_texts, s.test_labels, strict=True)) for s in (a, b)]
    assert pairs[0] == pairs[1]


def test_every_task_holds_out_by_content_not_by_seed() -> None:
    from fedtune.tasks.causal_lm.data import InstructionData, instruction_split
    from fedtune.tasks.preference.data import PreferenceData, preference_split

    cfg = DataConfig(test_fraction=0.25, partitioning="iid")
    prompts = [f"prompt {i}" for i in range(40)]
    lm = InstructionData(prompts, [f"answer {i}" for i in range(40)], [0] * 40)
    pref = PreferenceData(prompts, ["yes"] * 40, ["no"] * 40, [0] * 40)
    splits = [
        (
            instruction_split(lm, cfg, partition_id=0, num_partitions=1, seed=seed),
            preference_split(pref, cfg, partition_id=0, num_partitions=1, seed=seed),
        )
        for seed in (1, 2)
    ]
    for s, p in splits:
        assert len(s.test_prompts) == len(p.test.prompts) == 10
    assert sorted(splits[0][0].test_prompts) == sorted(splits[1][0].test_prompts)
    assert sorted(splits[0][1].test.prompts) == sorted(splits[1][1].test.prompts)


def test_the_held_out_fraction_is_the_nodes_not_the_run_configs(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # The attack: `test-fraction = 0.025` in the run config. The node's policy
    # (here 0.2) decides; the run config's value is only a simulation default.
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, **{"test-fraction": 0.025})
    assert len(runtime.test_set) == 12 and runtime.num_train_examples == 48


def test_a_node_never_trains_on_rows_it_held_out_before(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    from fedtune.config import ConfigError

    state = tmp_path / "state"
    _runtime(tiny_model_dir, toy_csv, tmp_path / "p1", state_dir=state)
    kept = json.loads((state / "held-out.json").read_text())
    assert len(kept["test"]) >= 5 and kept["train"]  # texts repeat in the toy data
    _runtime(tiny_model_dir, toy_csv, tmp_path / "p2", state_dir=state)  # same split: fine
    smaller = NodePolicy(eval_noise_multiplier=2.0, test_fraction=0.1)
    with pytest.raises(ConfigError, match=r"held out for evaluation when it fixed its split"):
        _runtime(tiny_model_dir, toy_csv, tmp_path / "p3", policy=smaller, state_dir=state)
    (state / "held-out.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"is not a held-out split fedtune wrote"):
        _runtime(tiny_model_dir, toy_csv, tmp_path / "p4", state_dir=state)


# -- per-example metrics of every task ---------------------------------------------------


def test_per_example_metrics_of_the_lm_tasks_agree_with_their_evaluations(
    tiny_llama_dir: Path,
) -> None:
    import torch
    from conftest import tiny_word_tokenizer

    from fedtune.config import ModelConfig
    from fedtune.model import build_model
    from fedtune.tasks.causal_lm import data as lm_data
    from fedtune.tasks.causal_lm.loss import answer_loss, example_metrics_lm
    from fedtune.tasks.preference import data as pref_data
    from fedtune.tasks.preference.loss import evaluate_preferences, example_metrics_preferences
    from fedtune.train import make_loader

    cpu = torch.device("cpu")
    cfg = ModelConfig(
        task="causal-lm", model_path=str(tiny_llama_dir), lora_target_modules="q_proj,v_proj"
    )
    model = build_model(cfg, num_labels=0, seed=0)
    with torch.no_grad():  # B starts at zero: move it so that policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    tok = tiny_word_tokenizer()
    prompts = ["what is a dog ?", "what is a saw ?", "what is a apple ?"]
    answers = ["a dog", "a saw is a kind of tool .", "a apple is a kind of food ."]
    lm = lm_data.InstructionDataset(tok, prompts, answers, max_length=64)
    per = example_metrics_lm(model, make_loader(lm, batch_size=2, shuffle=False), device=cpu)
    assert len(per["eval-loss"]) == len(per["eval-accuracy"]) == 3
    assert all(0.0 <= a <= 1.0 for a in per["eval-accuracy"])
    batch = lm.collate_fn()([lm[i] for i in range(3)])
    with torch.no_grad():  # the training loss is the mean of the per-example means
        assert float(answer_loss(model, batch)) == pytest.approx(np.mean(per["eval-loss"]), 1e-5)
    pairs = pref_data.PreferenceDataset(
        tok,
        pref_data.PreferenceData(prompts, answers, list(reversed(answers)), [0, 0, 0]),
        max_length=64,
    )
    loader = make_loader(pairs, batch_size=2, shuffle=False)
    per = example_metrics_preferences(model, loader, device=cpu, beta=0.1)
    whole = evaluate_preferences(model, loader, device=cpu, beta=0.1)
    assert np.mean(per["eval-loss"]) == pytest.approx(whole.loss, rel=1e-6)
    assert np.mean(per["eval-accuracy"]) == pytest.approx(whole.accuracy, rel=1e-6)
    margin = np.mean(per["eval-reward-margin"])
    assert margin == pytest.approx(whole.extra["eval-reward-margin"], rel=1e-6)


# -- the mechanism and the records ---------------------------------------------------------


def test_clipping_bounds_each_examples_share_of_the_sums() -> None:
    sums, n = clipped_sums(
        {"eval-loss": np.array([1e9, 5.0, -3.0, np.nan]), "eval-accuracy": np.array([1, 0, 1, 1])}
    )
    assert n == 4
    assert sums == pytest.approx([1.0 + 0.5 + 0.0 + 0.0, 3.0])  # 1e9 counts as the bound 10
    with pytest.raises(ValueError, match=r"held-out metric 'eval-bleu' has no per-example bound"):
        clipped_sums({"eval-bleu": np.zeros(3)})


def test_the_released_means_have_the_stated_error_bars() -> None:
    n, sigma = 200, 3.0
    values = {"eval-loss": np.full(n, 2.0), "eval-accuracy": np.full(n, 0.5)}
    noise = SeededNoise(7)
    draws = np.array(
        [
            list(release_metrics(values, noise_multiplier=sigma, noise=noise).metrics.values())
            for _ in range(2000)
        ]
    )
    width = {k: hi - lo for k, (lo, hi) in EXAMPLE_BOUNDS.items()}
    for j, key in enumerate(values):
        std = metric_std(noise_multiplier=sigma, num_examples=n, num_metrics=2, width=width[key])
        assert draws[:, j].mean() == pytest.approx(values[key][0], abs=4 * std / np.sqrt(2000))
        assert draws[:, j].std() == pytest.approx(std, rel=0.1)


def test_evaluation_records_are_checked_and_old_records_still_read() -> None:
    base = {
        "run_id": "r",
        "round": 0,
        "client": "c",
        "noise_multiplier": 2.0,
        "sample_rate": 1.0,
        "steps": 1,
        "max_grad_norm": 1.4,
        "delta": 1e-5,
        "accountant": "prv",
        "epsilon": 0.1,
        "level": "example",
        "timestamp": 1.0,
        "run_nonce": "n",
        "input_hash": "h",
        "relation": "replace-one",
        "noise": "csprng",
        "batch_size": 0,
        "local_epochs": 0,
        "num_examples": 12,
        "sampled_clients": 0,
        "tolerance": 0,
    }
    old = LedgerRecord.from_dict({**base, "round": 1})  # a line written before `kind`
    assert old.kind == "train" and old.accounted
    assert LedgerRecord.from_dict({**base, "kind": "eval"}).key == ("n/eval", 0, "c")
    with pytest.raises(ValueError, match=r"evaluation record \(kind 'eval'\) is one release"):
        LedgerRecord.from_dict({**base, "kind": "eval", "steps": 3})
    with pytest.raises(ValueError, match=r"exact evaluation \(kind 'eval-exact'\) must be 0"):
        LedgerRecord.from_dict({**base, "kind": "eval-exact"})
    with pytest.raises(ValueError, match=r"`kind` must be one of"):
        LedgerRecord.from_dict({**base, "kind": "bogus"})
    assert json.loads(json.dumps(LedgerRecord.from_dict({**base, "kind": "eval"}).to_dict()))


def test_the_plan_leaves_room_for_an_evaluation_every_round(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # Before: σ was calibrated for training alone, so with evaluations counted the last
    # round would have been declined for the budget.
    policy = NodePolicy(eval_noise_multiplier=10.0, test_fraction=0.2)
    extra = {"noise-multiplier": 0.0, "target-epsilon": 4.0}
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, policy=policy, **extra)
    plan = runtime.plan
    rounds = runtime.cfg.federation.num_rounds
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps * rounds)]
    proven = {"accountant": "discrete-rdp", **RO}  # grid DP-SGD: the default dp-noise
    alone = compute_epsilon(history, delta=1e-5, **proven)  # type: ignore[arg-type]
    history.append((10.0, 1.0, rounds + 1))
    assert 3.9 <= compute_epsilon(history, delta=1e-5, **proven) <= 4.0  # type: ignore[arg-type]
    assert alone < 3.9  # the room left for the evaluations
    # σ_eval too small for the target: the evaluations alone would spend it
    policy = NodePolicy(eval_noise_multiplier=1.0, test_fraction=0.2)
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, policy=policy, **extra)
    with pytest.raises(ConfigError, match=r"evaluations alone .* eval_noise_multiplier = 1"):
        _ = runtime.plan
