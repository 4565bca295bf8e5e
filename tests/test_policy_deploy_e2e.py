"""A deployed node keeps its own privacy policy (issue 26 A + E), end to end on 127.0.0.1.

One node, started with ``fedtune deploy supernode --epsilon-budget 2 --delta 1e-6``
(its tiny base model pinned, its token limit 16). Through its real worker (the socket
its ClientApps use) it refuses, one line each, run configs that ask for another δ,
held-out split, base model or token limit; then an in-policy run goes through the
SuperLink and completes, and the node's ledger, recomputed by Google's dp-accounting
(PLD, replace-one: independent of Opacus and fedtune) at the node's δ, stays within 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from tests.test_deploy_e2e import (  # noqa: F401 - `files` is the module's fixture
    MAX_EXAMPLES,
    RUN_CONFIG,
    RUNTIME_USER,
    Federation,
    Files,
    _fedtune,
    _ledger,
    files,
)

pytestmark = pytest.mark.slow

NODE = "node-0"
BUDGET = 2.0
DELTA = 1e-6


def _pld_epsilon(records: list[dict[str, object]], delta: float) -> float:
    """The ledger's ε by dp-accounting's PLD accountant (replace-one), at ``delta``."""
    dpa = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(
        neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=1e-3,
    )
    for r in records:
        event = dpa.GaussianDpEvent(float(r["noise_multiplier"]))  # type: ignore[arg-type]
        accountant.compose(
            dpa.PoissonSampledDpEvent(float(r["sample_rate"]), event),  # type: ignore[arg-type]
            int(r["steps"]),  # type: ignore[call-overload]
        )
    return float(accountant.get_epsilon(delta))


@pytest.fixture(scope="module")
def policed(files: Files) -> Iterator[Federation]:  # noqa: F811 - the imported fixture
    fed = Federation(files, "policy")
    fed.dir.mkdir(parents=True, exist_ok=True)
    config = {
        **RUN_CONFIG,
        "model-path": _model_path(files),
        "num-clients": 1,
        "min-clients": 1,
        "num-rounds": 2,
        "target-epsilon": 1.8,  # PRV-calibrated; PLD at 1e-3 may sit ~0.01 above it
        "target-delta": DELTA,
    }
    fed.config = fed.dir / "in-policy.toml"
    fed.config.write_text(
        "".join(
            f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
            for k, v in config.items()
        )
    )
    try:
        fed.start_superlink()
        fed.register(NODE, max_examples=MAX_EXAMPLES)
        flags = fed.node_policy() + ["--epsilon-budget", str(BUDGET), "--delta", str(DELTA)]
        fed.start_node(NODE, policy=flags)
        fed.wait_online(1)
        yield fed
    finally:
        fed.stop()


def _model_path(made: Files) -> str:
    for line in made.config.read_text().splitlines():
        if line.startswith("model-path"):
            return str(json.loads(line.split("=", 1)[1]))
    raise AssertionError("the federation's config has no model-path")


def _socket(fed: Federation) -> Path:
    runtime = fed.files.runtime / fed.name / NODE if RUNTIME_USER else fed.state(NODE) / "runtime"
    return runtime / "worker.sock"


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"target-delta": 0.05}, "`target-delta` = 0.05, this node's `delta` is 1e-06"),
        ({"test-fraction": 0.025}, "`test-fraction` = 0.025, this node's `test-fraction` is 0.2"),
        ({"model-path": "/no/such/model"}, "is not a base model this node's policy lists"),
        ({"model-path": "/etc"}, "is not a base model this node's policy lists"),
        ({"max-seq-length": 32}, "`max-seq-length` = 32, this node's `max-seq-length` is 16"),
    ],
)
# The server hears the fixed code ``policy:KEY`` (which key, never the node's value); the
# line with both values is the node's own log's.
def test_the_deployed_node_refuses_a_run_outside_its_policy_in_one_line(
    policed: Federation, change: dict[str, object], line: str
) -> None:
    from fedtune.errors import WorkerError
    from fedtune.node.channel import forward

    run = {
        **RUN_CONFIG,
        "model-path": _model_path(policed.files),
        "target-delta": DELTA,
        **change,
    }
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "sampled-clients": 1})})
    with pytest.raises(WorkerError) as err:
        forward(str(_socket(policed)), "train", content, run_id=900, run_config=run, timeout=300)
    text = str(err.value)
    key = next(iter(change))
    assert text == f"policy:{key}", text  # the code only: no path, no value of the node's
    policed.wait_log(NODE, line, timeout=30)  # one line with both values, in the node's log
    assert _ledger(policed, NODE) == []  # nothing was trained or released


def test_an_in_policy_run_completes_within_the_nodes_budget_at_its_delta(
    policed: Federation,
) -> None:
    import subprocess

    run_dir = policed.dir / "server-run"
    done = policed.run(run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ledger = _ledger(policed, NODE)
    assert [e["round"] for e in ledger] == [1, 2]
    # Every release the node made: training and its DP held-out evaluations (rounds 0-2).
    released = _ledger(policed, NODE, None)
    assert [e["round"] for e in released if e.get("kind") == "eval"] == [0, 1, 2]
    assert {e["delta"] for e in released} == {DELTA}
    assert {e["relation"] for e in released} == {"replace-one"}
    pld = _pld_epsilon(released, DELTA)
    print(f"node ledger at δ={DELTA:g}: PRV ε {ledger[-1]['epsilon']:.4f}, PLD ε {pld:.4f}")
    assert pld <= BUDGET
    state = policed.state(NODE)
    assert "delta = 1e-06" in (state / "policy.toml").read_text()
    audit = subprocess.run(
        _fedtune("audit", str(state), "--json", "--no-plot"),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = json.loads(audit.stdout)
    assert (report["delta"], report["budget_epsilon"]) == (DELTA, BUDGET)
