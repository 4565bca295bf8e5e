"""End to end, preference tuning: `fedtune simulate` with task = preference on a tiny Llama
(DP-SGD + CKKS), `fedtune audit`, stock PEFT reload, `fedtune evaluate` and `generate`.

Reuses the CLI runner of test_simulation_e2e (nothing may be left running afterwards).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_simulation_e2e import _fedtune


@pytest.fixture(scope="module")
def preference_run(
    tiny_llama_dir: Path, toy_preferences: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run_dir = tmp_path_factory.mktemp("pref") / "run"
    settings = {
        "task": "preference",
        "model-path": tiny_llama_dir,
        "data-path": toy_preferences,
        "lora-target-modules": "q_proj,v_proj",
        "num-clients": 2,
        "num-rounds": 2,
        "batch-size": 8,
        "local-epochs": 2,
        "max-seq-length": 64,
        "max-new-tokens": 8,
        "optimizer": "sgd",
        "learning-rate": 0.5,
        "beta": 0.5,
        "dp": "example",
        "target-epsilon": 50,
        "encryption": "true",
        # The test reads exact held-out metrics (a node's opt-out, recorded in the ledger
        # as eval-exact), not DP releases of them.
        "evaluation": "exact",
    }
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    proc = _fedtune("simulate", "--run-dir", str(run_dir), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 2/2" in proc.stderr
    return run_dir


@pytest.mark.slow
def test_a_private_preference_run_reports_its_metrics_and_passes_the_audit(
    preference_run: Path, tiny_llama_dir: Path
) -> None:
    records = [json.loads(x) for x in (preference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:
        assert {"eval-loss", "eval-accuracy", "eval-reward-margin"} <= set(r)
        assert 0 <= r["eval-accuracy"] <= 1
        assert all("eval-reward-margin" in c for c in r["clients"].values())
    assert records[0]["eval-reward-margin"] == pytest.approx(0.0, abs=1e-9)  # B = 0: π = π_ref
    assert records[0]["eval-accuracy"] == 0.5  # every pair a tie: chance
    assert 0 < records[-1]["epsilon"] <= 50

    audit = _fedtune("audit", str(preference_run), "--json", "--no-plot")
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = PeftModel.from_pretrained(base, str(preference_run / "adapter"))
    assert any("lora_B" in n for n, _ in model.named_parameters())

    ev = _fedtune("evaluate", str(preference_run), "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads(ev.stdout)
    # CKKS: the exported adapter is the decrypted mean, equal to what clients evaluated.
    assert report["eval-accuracy"] == pytest.approx(records[-1]["eval-accuracy"], abs=1e-6)
    assert report["eval-reward-margin"] == pytest.approx(
        records[-1]["eval-reward-margin"], rel=1e-3, abs=1e-4
    )

    samples = [json.loads(x) for x in (preference_run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(
        {"prompt", "reference", "rejected", "base", "adapter"} <= set(s) for s in samples
    )
    gen = _fedtune("generate", str(preference_run), "--prompt", samples[0]["prompt"], "--json")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert json.loads(gen.stdout) == [
        {"prompt": samples[0]["prompt"], "answer": samples[0]["adapter"]}
    ]
