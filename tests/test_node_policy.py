"""The node owns its privacy policy (issue 26, parts A and E): each attack as a test.

An active server chooses run configs. Before the policy, a node with its own
``--epsilon-budget 2`` took δ and the budget from the server's run config, released
at ε = 6.21 (δ = 1e-5) under a run asking ``target-delta = 0.05``, and `fedtune audit`
read that δ back from the ``config.toml`` the node wrote; at δ = 0.3 PRV returned a
negative ε; a ledger relabelled add-remove passed the audit; and a server-chosen
``model-path`` told the server whether a path existed on the node. The refusals are
exercised through the worker's real entry point (:func:`fedtune.node.round.handle`
with ``deployed=True``); the deployment itself is in ``test_policy_deploy_e2e.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import parse_run_config
from fedtune.errors import PolicyError
from fedtune.privacy.policy import MODEL_REFUSAL, ModelPin, NodePolicy
from fedtune.privacy.policy_file import load_policy, policy_toml, write_policy
from tests.conftest import toy_rows

LABELS = "animal,food,tool"
RUN: dict[str, object] = {
    "label-names": LABELS,
    "max-seq-length": 16,
    "batch-size": 8,
    "learning-rate": 0.05,
    "optimizer": "sgd",
    "seed": 3,
    "num-clients": 1,
    "min-clients": 1,
    "dp": "example",
    "noise-multiplier": 8.0,
}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _pin(model: Path) -> dict[str, str]:
    from fedtune.model.loading import model_digest

    return {"path": os.path.normpath(str(model.resolve())), "sha256": model_digest(model)}


@pytest.fixture(scope="module")
def tiny_pin(tiny_model_dir: Path) -> dict[str, str]:
    return _pin(tiny_model_dir)


def _node(tmp_path: Path, pin: dict[str, str] | None, **policy: Any) -> dict[str, object]:
    """A node's own settings and STATE_DIR/policy.toml (what `deploy supernode` writes)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    data = tmp_path / "own.csv"
    with data.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(toy_rows(8, seed=5))
    values: dict[str, Any] = {"max-seq-length": 16, **policy}
    if pin is not None:
        values["models"] = [pin]
    write_policy(state, load_policy(None, values))
    return {"state-dir": str(state), "data-path": str(data), "name": "node-a"}


def _train(run: dict[str, object], node: dict[str, object], run_id: int = 1) -> RecordDict:
    from fedtune.node.round import handle

    content = RecordDict({"config": ConfigRecord({"server-round": 1, "sampled-clients": 1})})
    return handle("train", content, run_config=run, node_config=node, run_id=run_id, deployed=True)


def _ledger(node: dict[str, object]) -> list[dict[str, Any]]:
    path = Path(str(node["state-dir"])) / "privacy" / "node-a.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# -- A: δ and the budget are the node's --------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("target-delta", 0.05, r"`target-delta` = 0\.05, this node's `delta` is 1e-05"),
        ("test-fraction", 0.025, r"`test-fraction` = 0\.025, this node's `test-fraction` is 0\.2"),
        ("max-seq-length", 32, r"`max-seq-length` = 32, this node's `max-seq-length` is 16"),
    ],
)
def test_a_run_outside_the_nodes_policy_is_refused_before_training_in_one_line(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_pin: dict[str, str],
    *,
    key: str,
    value: object,
    match: str,
) -> None:
    node = {**_node(tmp_path, tiny_pin), "epsilon-budget": 2.0}
    run = {**RUN, "model-path": str(tiny_model_dir), key: value}
    with pytest.raises(PolicyError, match=match) as err:
        _train(run, node)
    assert "\n" not in str(err.value)
    assert _ledger(node) == []  # nothing trained, nothing released


def test_the_ledger_uses_the_nodes_delta_not_the_servers(
    tmp_path: Path, tiny_model_dir: Path, tiny_pin: dict[str, str]
) -> None:
    """An in-policy run (the server proposes a smaller δ) is recorded at the node's δ."""
    node = _node(tmp_path, tiny_pin, delta=1e-6)
    run = {**RUN, "model-path": str(tiny_model_dir), "target-delta": 1e-8}
    reply = _train(run, node)
    assert "update" in reply.config_records
    (record,) = _ledger(node)
    assert record["delta"] == 1e-6 and record["relation"] == "replace-one"


def test_sigma_is_calibrated_at_the_nodes_delta() -> None:
    from fedtune.train.plan import privacy_plan

    cfg = parse_run_config({**RUN, "noise-multiplier": 0.0, "accountant": "rdp"})
    server = privacy_plan(cfg, num_train_examples=100)
    node = privacy_plan(cfg, num_train_examples=100, delta=1e-9)
    assert node.noise_multiplier > server.noise_multiplier


def test_the_budget_is_the_nodes_even_when_the_server_proposes_a_larger_one(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_pin: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # σ = 1, q = 8/19, 2 steps: ε ≈ 5.5 at δ = 1e-5, inside the server's 8, over the node's 2.
    node = _node(tmp_path, tiny_pin, **{"epsilon-budget": 2.0})
    run = {**RUN, "model-path": str(tiny_model_dir), "noise-multiplier": 1.0}
    run["epsilon-budget"] = 8.0
    with caplog.at_level("WARNING", logger="fedtune.client"):
        reply = _train(run, node)
    assert reply.config_records["info"]["declined"] == "budget-spent"  # a fixed code
    assert "over the budget 2 (delta 1e-05)" in caplog.text  # the numbers: the node's log
    assert "update" not in reply.config_records and _ledger(node) == []


def test_a_delta_not_below_one_over_n_is_refused_before_training(
    tmp_path: Path, tiny_model_dir: Path, tiny_pin: dict[str, str]
) -> None:
    """δ = 0.3 with ~19 examples: refused up front (it used to train, then fail to write)."""
    node = _node(tmp_path, tiny_pin, delta=0.3)
    run = {**RUN, "model-path": str(tiny_model_dir), "target-delta": 0.3}
    with pytest.raises(PolicyError, match=r"`delta` = 0\.3 is not below 1 / n_k = 1/\d+"):
        _train(run, node)
    assert _ledger(node) == []


def test_a_simulated_client_runs_the_same_checks_with_the_run_configs_values() -> None:
    cfg = parse_run_config({**RUN, "target-delta": 0.3, "epsilon-budget": 3.0})
    policy = NodePolicy.from_run_config(cfg)
    assert (policy.delta, policy.epsilon_budget, policy.source) == (0.3, 3.0, "run-config")
    policy.check_run(cfg)  # its own values: nothing to refuse
    with pytest.raises(PolicyError, match=r"not below 1 / n_k = 1/19"):
        policy.check_examples(19)


def test_epsilon_is_never_negative_at_a_large_delta() -> None:
    """PRV's estimate at δ = 0.3 is −0.262 for σ = 2, q = 0.2, 5 steps; 0 is the bound."""
    from fedtune.privacy import compute_epsilon

    for accountant in ("prv", "rdp"):
        eps = compute_epsilon(
            [(2.0, 0.2, 5)], delta=0.3, accountant=accountant, relation="replace-one"
        )
        assert eps >= 0.0
    # RDP's conversion gives −0.269 for σ = 4, q = 0.2, 5 steps: clamped to exactly 0.
    assert (
        compute_epsilon([(4.0, 0.2, 5)], delta=0.3, accountant="rdp", relation="replace-one") == 0.0
    )


# -- E: base models the node pinned, and nothing about its file system --------------------


def test_a_server_chosen_model_path_gets_one_fixed_refusal_whether_or_not_it_exists(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    node = _node(tmp_path, None)  # no pins: the bundled model only
    texts = []
    for path in (str(tiny_model_dir), "/no/such/model", "relative/dir", "/etc"):
        with pytest.raises(PolicyError) as err:
            _train({**RUN, "model-path": path}, node)
        texts.append(str(err.value))
    assert set(texts) == {MODEL_REFUSAL}
    assert "exist" not in MODEL_REFUSAL and "\n" not in MODEL_REFUSAL


def test_a_pinned_model_whose_files_changed_is_refused(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    node = _node(tmp_path, _pin(copy))
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    with pytest.raises(PolicyError, match="no longer matches the SHA-256"):
        _train({**RUN, "model-path": str(copy)}, node)


def test_model_pins_compare_text_and_never_touch_the_servers_path() -> None:
    pin = ModelPin(path="/srv/models/minilm", sha256="a" * 64)
    policy = NodePolicy(models=(pin,))
    assert policy.model_pin("/srv/models/../models/minilm/") == pin
    assert policy.model_pin("") is None
    with pytest.raises(PolicyError, match="is not a base model this node's policy lists"):
        policy.model_pin("/srv/models/other")


# -- The policy itself: validated, read back like any file -------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"delta": 0.0}, r"`delta` must be in \(0, 1\), got 0\.0"),
        ({"delta": True}, r"`delta` must be in \(0, 1\), got True"),
        ({"epsilon_budget": math.inf}, r"`epsilon-budget` must be a finite ε > 0, got inf"),
        ({"relation": "add-remove"}, r"`relation` must be 'replace-one'.*got 'add-remove'"),
        ({"test_fraction": 1.0}, r"`test-fraction` must be in \(0, 1\), got 1\.0"),
        ({"evaluation": "plain"}, r"`evaluation` must be one of dp, exact, got 'plain'"),
        ({"max_seq_length": 4}, r"`max-seq-length` must be an integer >= 8, got 4"),
    ],
)
def test_policy_errors_name_the_key_and_the_value(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        NodePolicy(**fields)


def test_model_pin_errors_name_the_field_and_the_remedy() -> None:
    with pytest.raises(PolicyError, match=r"`path` must be an absolute directory, got 'm'"):
        ModelPin(path="m", sha256="a" * 64)
    with pytest.raises(PolicyError, match=r"`sha256` of '/m' must be 64 lowercase hex.*--model"):
        ModelPin(path="/m", sha256="xyz")


def test_the_policy_file_round_trips_and_refuses_what_is_not_a_policy(tmp_path: Path) -> None:
    policy = NodePolicy(
        delta=1e-6,
        epsilon_budget=2.0,
        test_fraction=0.25,
        evaluation="exact",
        max_seq_length=32,
        models=(ModelPin(path="/srv/m", sha256="b" * 64),),
    )
    write_policy(tmp_path, policy)
    assert load_policy(tmp_path) == policy
    assert oct((tmp_path / "policy.toml").stat().st_mode & 0o777) == "0o600"
    assert load_policy(tmp_path, {"delta": 1e-7, "name": "x"}).delta == 1e-7  # flags win
    assert load_policy(None).max_seq_length == 48  # the safe default, not the server's
    (tmp_path / "policy.toml").write_text("target-epsilon = 50\n" + policy_toml(policy))
    with pytest.raises(PolicyError, match=r"unknown policy key\(s\) \['target-epsilon'\]"):
        load_policy(tmp_path)
    (tmp_path / "policy.toml").unlink()
    (tmp_path / "elsewhere.toml").write_text("delta = 0.5\n")
    (tmp_path / "policy.toml").symlink_to(tmp_path / "elsewhere.toml")
    with pytest.raises(PolicyError, match="is not a regular file"):
        load_policy(tmp_path)


def test_deploy_supernode_pins_its_models_and_writes_the_policy(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from fedtune.deploy.node import policy_settings, write_node_policy

    args = argparse.Namespace(
        delta=1e-6,
        test_fraction=None,
        max_seq_length=16,
        evaluation=None,
        eval_noise_multiplier=None,
        model=[tiny_model_dir],
    )
    config: dict[str, object] = {"epsilon-budget": 2.0, **policy_settings(args)}
    json.dumps(config)  # it travels to the worker as JSON
    policy = write_node_policy(tmp_path, config)
    assert load_policy(tmp_path) == policy
    assert (policy.delta, policy.epsilon_budget, policy.max_seq_length) == (1e-6, 2.0, 16)
    assert policy.models == (ModelPin(**_pin(tiny_model_dir)),)


def test_deploy_supernode_flags_reach_the_policy(tmp_path: Path, tiny_model_dir: Path) -> None:
    from fedtune.cli.dispatch import build_parser
    from fedtune.deploy.node import policy_settings, write_node_policy

    argv = ["deploy", "supernode", "--superlink", "127.0.0.1:1", "--ca", "ca.crt"]
    argv += ["--key", "k", "--state-dir", str(tmp_path), "--port", "1"]
    argv += ["--delta", "1e-6", "--test-fraction", "0.25", "--max-seq-length", "16"]
    argv += ["--evaluation", "exact", "--model", str(tiny_model_dir)]
    settings = policy_settings(build_parser().parse_args(argv))
    policy = write_node_policy(tmp_path, settings)
    assert (policy.delta, policy.test_fraction, policy.evaluation) == (1e-6, 0.25, "exact")
    with pytest.raises(PolicyError, match=r"`delta` must be in \(0, 1\), got 2\.0"):
        write_node_policy(tmp_path, {**settings, "delta": 2.0})


# -- The audit: the node's δ, the pinned relation ----------------------------------------

ROUND = dict(
    run_id="run-a",
    run_nonce="nonce-a",
    client="node-a",
    noise_multiplier=2.0,
    sample_rate=1.0,
    steps=1,
    max_grad_norm=1.0,
    accountant="prv",
    level="example",
    noise="csprng",
    batch_size=10,
    local_epochs=1,
    num_examples=10,
)


def _write_ledger(folder: Path, *, delta: float, relation: str = "replace-one") -> None:
    from fedtune.privacy import PrivacyLedger

    ledger = PrivacyLedger(folder / "privacy" / "node-a.jsonl")
    for r in (1, 2, 3):
        ledger.record(
            input_hash=f"in-{r}",
            round=r,
            delta=delta,
            relation=relation,
            timestamp=1000.0 + r,
            **ROUND,  # type: ignore[arg-type]
        )


def _audit(path: Path) -> tuple[int, dict[str, Any]]:
    from fedtune.cli.audit import add_parser, run

    parser = argparse.ArgumentParser(prog="fedtune")
    add_parser(parser.add_subparsers(dest="command"))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
        code = run(parser.parse_args(["audit", str(path), "--json", "--no-plot"]))
    return code, json.loads(buffer.getvalue())


def test_the_audit_never_takes_delta_from_the_servers_config_toml(tmp_path: Path) -> None:
    """A state dir whose config.toml (the server's run config) says δ = 0.05."""
    _write_ledger(tmp_path, delta=0.05)
    (tmp_path / "config.toml").write_text("target-delta = 0.05\nepsilon-budget = 2.0\n")
    code, report = _audit(tmp_path)
    assert code == 1 and report["delta"] == 1e-5
    write_policy(tmp_path, NodePolicy(delta=1e-5, epsilon_budget=2.0))
    code, report = _audit(tmp_path)
    (client,) = report["clients"]
    assert code == 1 and client["delta"] == 1e-5 and client["verdict"] == "overrun"
    assert "policy.toml" in report["delta_source"]


def test_the_audit_states_the_nodes_delta_from_its_policy(tmp_path: Path) -> None:
    _write_ledger(tmp_path, delta=1e-6)
    write_policy(tmp_path, NodePolicy(delta=1e-6, epsilon_budget=20.0))
    code, report = _audit(tmp_path)
    assert code == 0 and report["delta"] == 1e-6 and report["budget_epsilon"] == 20.0


def test_a_ledger_relabelled_add_remove_fails_the_audit(tmp_path: Path) -> None:
    """n_k was published, so the neighbours have one size: replace-one, whatever it says."""
    from fedtune.privacy import compute_epsilon
    from fedtune.privacy.audit import audit_records
    from fedtune.privacy.ledger import PrivacyLedger

    _write_ledger(tmp_path, delta=1e-5, relation="add-remove")
    records = PrivacyLedger(tmp_path / "privacy" / "node-a.jsonl").records()
    report = audit_records(records, budget_epsilon=None, delta=1e-5)
    (client,) = report.clients
    honest = compute_epsilon([(2.0, 1.0, 3)], delta=1e-5, accountant="prv", relation="replace-one")
    assert not report.ok and client.relation == "replace-one"
    assert client.epsilon_prv == pytest.approx(honest, abs=0.02)
    assert client.epsilon_prv > records[-1].epsilon + 1.0  # the relabel hid ε 8.4 as 3.7
    assert any("declares relation 'add-remove'" in p for p in client.problems)


def test_the_audit_refuses_a_delta_not_below_one_over_n(tmp_path: Path) -> None:
    from fedtune.privacy.audit import audit_records
    from fedtune.privacy.ledger import PrivacyLedger

    _write_ledger(tmp_path, delta=0.3)
    records = PrivacyLedger(tmp_path / "privacy" / "node-a.jsonl").records()
    assert all(r.epsilon >= 0 for r in records)
    (client,) = audit_records(records, budget_epsilon=None, delta=0.3).clients
    assert client.verdict == "inconsistent" and client.epsilon_prv >= 0
    assert any("not below 1 / n_k = 1/10" in p for p in client.problems)
