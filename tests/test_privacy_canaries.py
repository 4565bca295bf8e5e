"""Gradient canaries and the empirical ε lower bound they give (one-run auditing)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config import ConfigError, parse_run_config
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.canaries import CanaryState, canary_file, load_canaries
from fedtune.train.levels import ExampleLevel
from fedtune.train.runtime import ClientRuntime, GlobalState


def _runtime(model: Path, data: Path, privacy_dir: Path, **extra: object) -> ClientRuntime:
    cfg = parse_run_config(
        {
            "model-path": str(model),
            "data-path": str(data),
            "num-clients": 2,
            "batch-size": 8,
            "label-names": "animal,food,tool",
            "num-rounds": 10,
            "optimizer": "sgd",
            "learning-rate": 0.5,
            "momentum": 0.0,
            "accountant": "rdp",
            "epsilon-budget": 1e9,
            "max-step-factor": 0,
            **extra,
        }
    )
    return ClientRuntime(cfg, partition_id=0, num_partitions=2, privacy_dir=privacy_dir)


def _federate(runtime: ClientRuntime, rounds: int) -> None:
    """One client alone: each round starts from what it released the round before."""
    state = None
    for rnd in range(1, rounds + 1):
        out = runtime.train(state, server_round=rnd)
        assert out.payload is not None, out.declined
        state = GlobalState(out.payload, out.num_examples)


def _audit(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    import argparse
    import json

    from fedtune.cli.audit import add_parser, run

    parser = argparse.ArgumentParser(prog="fedtune")
    add_parser(parser.add_subparsers(dest="command"))
    capsys.readouterr()
    code = run(parser.parse_args(["audit", str(path), "--json", "--no-plot", "--delta", "1e-5"]))
    return code, json.loads(capsys.readouterr().out)


def _bound_and_claim(runtime: ClientRuntime, privacy_dir: Path) -> tuple[float, float]:
    canaries = load_canaries(canary_file(privacy_dir, runtime.name))
    result = canaries.bound(delta=runtime.cfg.privacy.target_delta)
    records = PrivacyLedger(privacy_dir / f"{runtime.name}.jsonl").records()
    claimed = records[-1].epsilon if records else float("inf")
    print(
        f"canaries {result.canaries}, {result.correct}/{result.guesses} right, "
        f"bound {result.epsilon_lower_bound:.3f}, claimed {claimed:.3f}"
    )
    return result.epsilon_lower_bound, claimed


def _dp_run(
    model: Path, data: Path, privacy_dir: Path, *, sigma: float, canaries: int, **extra: object
) -> tuple[float, float]:
    """Ten DP-SGD rounds of one client with canaries: (empirical bound, claimed ε)."""
    runtime = _runtime(
        model,
        data,
        privacy_dir,
        dp="example",
        **{"noise-multiplier": sigma, "audit-canaries": canaries, **extra},
    )
    _federate(runtime, 10)
    return _bound_and_claim(runtime, privacy_dir)


def test_canaries_are_the_auditors_and_survive_a_new_process(tmp_path: Path) -> None:
    a = CanaryState.create(m=50, num_coords=200, clip_norm=1.0, seed=7)
    b = CanaryState.create(m=50, num_coords=200, clip_norm=1.0, seed=7)
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.included, b.included)
    assert len(set(a.coords.tolist())) == 50 and 10 < a.included.sum() < 40
    other = CanaryState.create(m=50, num_coords=200, clip_norm=1.0, seed=8)
    assert not np.array_equal(a.included, other.included)
    a.add_release(1, np.arange(200.0))
    a.save(tmp_path / "c.canaries.json")
    back = load_canaries(tmp_path / "c.canaries.json")
    assert np.array_equal(back.scores, a.coords.astype(float)) and back.rounds == [1]
    assert oct((tmp_path / "c.canaries.json").stat().st_mode & 0o777) == "0o600"
    assert not back.repeated and back.bound(delta=1e-5) == a.bound(delta=1e-5)
    a.add_release(1, np.arange(200.0) + 2 * (np.arange(200) % 2))  # round 1 again
    assert a.repeated and a.repeat_scores is not None
    np.testing.assert_array_equal(a.repeat_scores, 2.0 * (a.coords % 2))
    assert np.array_equal(a.scores, back.scores)  # a repeat is scored apart
    a.save(tmp_path / "c.canaries.json")
    again = load_canaries(tmp_path / "c.canaries.json")
    assert again.repeated and again.bound(delta=1e-5) == a.bound(delta=1e-5)
    with pytest.raises(ValueError, match="needs as many trainable coordinates"):
        CanaryState.create(m=201, num_coords=200, clip_norm=1.0, seed=7)
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="is not a fedtune canary file"):
        load_canaries(tmp_path / "bad.json")


def test_included_canaries_join_the_clipped_sum_before_the_noise() -> None:
    from torch import nn
    from torch.utils.data import TensorDataset

    from fedtune.privacy.dpsgd import make_dp_training
    from fedtune.privacy.noise import SeededNoise

    state = CanaryState.create(m=6, num_coords=12, clip_norm=2.0, seed=1)
    model = nn.Sequential(nn.Linear(3, 3))  # 9 weights + 3 biases = 12 coordinates
    data = TensorDataset(torch.randn(4, 3), torch.zeros(4))
    dp = make_dp_training(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data=data,
        expected_batch_size=4,  # q = 1: every canary slot is drawn every step
        noise_multiplier=1e-9,
        max_grad_norm=2.0,
        generator=torch.Generator().manual_seed(0),
        noise=SeededNoise(0),
        canaries=state.step_source(1),
    )
    x, _ = next(iter(dp.data_loader))
    dp.optimizer.zero_grad()
    (dp.module(x) * 0.0).sum().backward()  # real examples: zero gradient
    dp.optimizer.step()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]).numpy()
    dp.close()
    expected = np.zeros(12)
    expected[state.coords[state.included]] = -2.0 / 4  # -C e_j in the sum, / expected batch
    np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("sigma", "least"),
    [(0.05, 2.0), (2.0, 0.0)],  # almost no noise: the issue asks for >= 2 with 500 canaries
)
def test_a_correct_run_stays_under_its_claim_and_the_audit_has_power(  # noqa: PLR0917
    tiny_model_dir: Path,
    toy_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sigma: float,
    least: float,
) -> None:
    bound, claimed = _dp_run(tiny_model_dir, toy_csv, tmp_path, sigma=sigma, canaries=500)
    assert least <= bound <= claimed, (bound, claimed)
    code, out = _audit(tmp_path, capsys)
    assert out["empirical"]["refuted"] is False
    if sigma >= 1:  # at σ = 0.05 PRV recomputes ε = ∞ against RDP's 95,484: "under-reported"
        assert code == 0


def _broken_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise is never added, while the ledger still records the planned σ."""
    from fedtune.privacy.optimizer import sourced_dp_optimizer

    cls = sourced_dp_optimizer()
    honest = cls.add_noise

    def without_noise(self):  # type: ignore[no-untyped-def]
        saved, self.noise_multiplier = self.noise_multiplier, 0.0
        try:
            honest(self)
        finally:
            self.noise_multiplier = saved

    monkeypatch.setattr(cls, "add_noise", without_noise)


def _broken_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-example gradients are never clipped by Opacus (``dp-noise = "float"``); the
    noise is still σ C.

    On the grid a step like this never leaves: the optimizer's check of the rounded rows
    refuses it (``test_privacy_dpsgd``: ``..._refuses_rows_beyond_the_accounted_bound``).
    With that check broken too, the audit alone refuted a clip-less grid run at σ = 8
    (claimed 3.14 by the looser discrete-RDP accountant) in only 75 of 79 runs, too few
    for a test; the float run's claim (1.39) leaves the bound room: 60 of 60, least 1.71.
    """
    from opacus.optimizers.optimizer import DPOptimizer

    honest = DPOptimizer.clip_and_accumulate

    def unclipped(self):  # type: ignore[no-untyped-def]
        saved, self.max_grad_norm = self.max_grad_norm, math.inf  # every factor is 1
        try:
            honest(self)
        finally:
            self.max_grad_norm = saved

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", unclipped)


@pytest.mark.parametrize(
    ("breakage", "dp_noise"),
    [(_broken_noise, "grid"), (_broken_noise, "float"), (_broken_clipping, "float")],
)
def test_the_audit_fails_on_a_broken_mechanism(  # noqa: PLR0917 - fixtures
    tiny_model_dir: Path,
    toy_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    breakage,  # type: ignore[no-untyped-def]
    dp_noise: str,
) -> None:
    breakage(monkeypatch)
    # 1000 canaries bound ε at most near 4.2 (all guesses right); σ = 8 claims less than
    # that (3.14 on the grid, proven by discrete RDP; 1.39 with float noise), so it is
    # refutable. Measured over 40 runs each: least bound 3.71 for both noise breakages.
    bound, claimed = _dp_run(
        tiny_model_dir, toy_csv, tmp_path, sigma=8.0, canaries=1000, **{"dp-noise": dp_noise}
    )
    _assert_refuted(tmp_path, capsys, bound, claimed)


def test_the_audit_fails_when_a_round_is_released_twice(
    tiny_model_dir: Path,
    toy_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Broken: the client forgets it released a round and trains it again.

    The ledger's record of the round is idempotent, so the second release is never
    counted; the retraining samples fresh batches while the noise, keyed to the round
    (``seeded-noise``), is the same, so the two releases differ by a noise-free
    difference of two clipped sums. (Released again under fresh noise instead, the
    round's ε grows by about √2: below what one run with 1000 canaries resolves.)
    """
    import secrets

    monkeypatch.setattr(PrivacyLedger, "release", lambda self, **_: None)
    honest = ExampleLevel.train

    def fresh_batches(self, trainer, plan, seed, *rest):  # type: ignore[no-untyped-def]
        noise, canaries = rest
        if canaries is not None:  # canary slots are drawn with the batches
            canaries.rng = np.random.default_rng(secrets.randbits(63))
        return honest(self, trainer, plan, secrets.randbits(63), noise, canaries)

    monkeypatch.setattr(ExampleLevel, "train", fresh_batches)
    runtime = _runtime(
        tiny_model_dir,
        toy_csv,
        tmp_path,
        dp="example",
        **{"noise-multiplier": 8.0, "audit-canaries": 1000, "seeded-noise": True},
    )
    state = None
    for rnd in range(1, 11):
        first = runtime.train(state, server_round=rnd)
        again = runtime.train(state, server_round=rnd)
        assert first.payload is not None and again.payload is not None
        assert again.epsilon == first.epsilon  # the second release is not counted
        state = GlobalState(first.payload, first.num_examples)
    assert len(PrivacyLedger(tmp_path / f"{runtime.name}.jsonl").records()) == 10
    bound, claimed = _bound_and_claim(runtime, tmp_path)
    _assert_refuted(tmp_path, capsys, bound, claimed)


def test_an_honest_replay_is_not_scored_again(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    runtime = _runtime(
        tiny_model_dir,
        toy_csv,
        tmp_path,
        dp="example",
        **{"noise-multiplier": 6.0, "audit-canaries": 50},
    )
    first = runtime.train(None, server_round=1)
    again = runtime.train(None, server_round=1)
    assert again.replayed and again.payload == first.payload
    canaries = load_canaries(canary_file(tmp_path, runtime.name))
    assert canaries.rounds == [1] and not canaries.repeated


def _assert_refuted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bound: float, claimed: float
) -> None:
    assert bound > claimed, (bound, claimed)
    code, out = _audit(tmp_path, capsys)
    assert code == 1  # the ledger's arithmetic is fine; the canaries refute it
    assert [c["verdict"] for c in out["clients"]] == ["ok"]
    empirical = out["empirical"]
    assert empirical["client"] == "client-0" and empirical["refuted"] is True
    assert empirical["epsilon-lower-bound"] == pytest.approx(bound)
    assert empirical["epsilon-claimed"] == pytest.approx(claimed)
    assert {"confidence", "canaries", "guesses", "correct"} <= set(empirical)
    assert out["clients"][0]["empirical"]["canaries"] == 1000


def test_without_dp_canaries_are_found(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv, tmp_path, **{"audit-canaries": 500})
    _federate(runtime, 5)
    bound, claimed = _bound_and_claim(runtime, tmp_path)
    assert claimed == float("inf") and bound >= 2.0
    code, out = _audit(tmp_path, capsys)  # no ledger: the bound alone, claimed ε = ∞
    assert code == 0 and out["empirical"]["epsilon-claimed"] == "inf"


def test_canaries_are_refused_where_they_cannot_mean_anything() -> None:
    with pytest.raises(ConfigError, match="`audit-canaries`.*needs dp"):
        parse_run_config({"audit-canaries": 10, "dp": "client", "encryption": True})
    with pytest.raises(ConfigError, match="`audit-canaries`.*>= 0"):
        parse_run_config({"audit-canaries": -1})


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("audit-canaries", 10, "`audit-canaries` is for simulations only"),
        ("seeded-noise", True, "`seeded-noise` = true is for simulations only"),
    ],
)
def test_a_deployed_node_refuses_simulation_only_keys(key: str, value: object, match: str) -> None:
    from fedtune.node.round import runtime_for

    node = {"partition-id": 0, "num-partitions": 1}
    with pytest.raises(ConfigError, match=match):
        runtime_for({key: value}, node, run_id=1, deployed=True)


def test_canaries_audit_the_causal_lm_task(
    tiny_llama_dir: Path, toy_instructions: Path, tmp_path: Path
) -> None:
    """The instruction task's DP-SGD takes canaries the same way (answer-token loss)."""
    cfg = parse_run_config(
        {
            "task": "causal-lm",
            "model-path": str(tiny_llama_dir),
            "data-path": str(toy_instructions),
            "lora-target-modules": "q_proj,v_proj",
            "num-clients": 1,
            "min-clients": 1,
            "batch-size": 8,
            "optimizer": "sgd",
            "learning-rate": 0.5,
            "momentum": 0.0,
            "dp": "example",
            "noise-multiplier": 0.05,
            "accountant": "rdp",
            "epsilon-budget": 1e9,
            "max-step-factor": 0,
            "audit-canaries": 500,
        }
    )
    runtime = ClientRuntime(cfg, partition_id=0, num_partitions=1, privacy_dir=tmp_path)
    _federate(runtime, 3)
    bound, claimed = _bound_and_claim(runtime, tmp_path)
    assert 2.0 <= bound <= claimed, (bound, claimed)
