"""End to end, causal LM: `fedtune simulate` with task = causal-lm on a tiny config-built
Llama (plain, then DP + encryption), stock PEFT reload, `fedtune generate` and `evaluate`.

Reuses the CLI runner of test_simulation_e2e (its own session; nothing may be left
running afterwards).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_simulation_e2e import _fedtune

LM_ARGS = (
    "--set",
    "task=causal-lm",
    "--set",
    "lora-target-modules=q_proj,v_proj",
    "--set",
    "num-clients=3",
    "--set",
    "batch-size=8",
    "--set",
    "local-epochs=4",
    "--set",
    "max-seq-length=64",
    "--set",
    "max-new-tokens=12",
)


def _simulate(run_dir: Path, model: Path, data: Path, *extra: str, rounds: int = 3) -> str:
    proc = _fedtune(
        "simulate",
        "--run-dir",
        str(run_dir),
        "--set",
        f"model-path={model}",
        "--set",
        f"data-path={data}",
        *LM_ARGS,
        "--set",
        f"num-rounds={rounds}",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"round {rounds}/{rounds}" in proc.stderr and "eval-perplexity" in proc.stderr
    return proc.stderr


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lm_run(
    tiny_llama_dir: Path, toy_instructions: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    _simulate(run_dir, tiny_llama_dir, toy_instructions, "--set", "learning-rate=0.02")
    return run_dir


@pytest.fixture(scope="module")
def private_lm_run(
    tiny_llama_dir: Path, toy_instructions: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run_dir = tmp_path_factory.mktemp("lm-private") / "run"
    _simulate(
        run_dir,
        tiny_llama_dir,
        toy_instructions,
        "--set",
        "dp=example",
        "--set",
        "encryption=true",
        "--set",
        "optimizer=sgd",
        "--set",
        "learning-rate=0.5",
        "--set",
        "target-epsilon=50",
        # The test reads the perplexity curve: exact held-out metrics (a node's opt-out,
        # recorded in the ledger as eval-exact), not DP releases of them.
        "--set",
        "evaluation=exact",
    )
    return run_dir


@pytest.mark.slow
def test_lm_run_lowers_answer_perplexity_and_writes_samples(lm_run: Path) -> None:
    records = _records(lm_run)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["eval-perplexity"] == pytest.approx(2.718281828 ** r["eval-loss"], rel=1e-9)
        assert set(r["clients"]) == {"client-0", "client-1", "client-2"}
        assert all("eval-perplexity" in c for c in r["clients"].values())
    ppl = [r["eval-perplexity"] for r in records]
    assert ppl[-1] < ppl[0] * 0.9, ppl
    assert (lm_run / "metrics.png").is_file()
    samples = [json.loads(x) for x in (lm_run / "samples.jsonl").read_text().splitlines()]
    assert 1 <= len(samples) <= 4
    assert all(s["prompt"].startswith("what is a") and s["reference"] for s in samples)
    assert all(isinstance(s["adapter"], str) and isinstance(s["base"], str) for s in samples)


@pytest.mark.slow
def test_lm_adapter_loads_with_stock_peft_and_generate_answers(
    lm_run: Path, tiny_llama_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = PeftModel.from_pretrained(base, str(lm_run / "adapter"))
    assert any("lora_B" in n for n, _ in model.named_parameters())
    config = json.loads((lm_run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"

    sample = json.loads((lm_run / "samples.jsonl").read_text().splitlines()[0])
    gen = _fedtune("generate", str(lm_run), "--prompt", sample["prompt"], "--json")
    assert gen.returncode == 0, gen.stderr[-2000:]
    rows = json.loads(gen.stdout)
    # Greedy decoding of the same adapter: the CLI reproduces the run's own sample answer.
    assert rows == [{"prompt": sample["prompt"], "answer": sample["adapter"]}]

    ev = _fedtune("evaluate", str(lm_run), "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads(ev.stdout)
    assert report["eval-perplexity"] == pytest.approx(report["reported-perplexity"], rel=1e-6)


@pytest.mark.slow
def test_lm_run_with_dp_and_encryption_lowers_perplexity_and_keeps_ledgers(
    private_lm_run: Path,
) -> None:
    from fedtune.privacy import PrivacyLedger

    records = _records(private_lm_run)
    ppl = [r["eval-perplexity"] for r in records]
    assert ppl[-1] < ppl[0], ppl
    assert (private_lm_run / "keys" / "secret.ctx").is_file()
    for name in ("client-0", "client-1", "client-2"):
        records_of = PrivacyLedger(private_lm_run / "privacy" / f"{name}.jsonl").records()
        # The exact held-out metrics this run opted into are in the ledger too, unaccounted.
        assert {e.kind for e in records_of} == {"train", "eval-exact"}
        ledger = [e for e in records_of if e.kind == "train"]
        assert [e.round for e in ledger] == [1, 2, 3]
        assert ledger[-1].epsilon == pytest.approx(records[-1]["clients"][name]["epsilon"])
    assert 0 < records[-1]["epsilon"] <= 50
    assert (private_lm_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (private_lm_run / "samples.jsonl").is_file()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ["--set", "task=seq2seq"],
            "`task` must be one of classification, causal-lm, preference, got 'seq2seq'",
        ),
        (["--set", "prompt-column=question"], "`prompt-column` is 'question', but"),
    ],
)
def test_bad_lm_input_is_one_clear_error(
    args: list[str], match: str, tiny_llama_dir: Path, toy_instructions: Path, tmp_path: Path
) -> None:
    base = [
        "--set",
        "task=causal-lm",
        "--set",
        f"model-path={tiny_llama_dir}",
        "--set",
        f"data-path={toy_instructions}",
        "--set",
        "lora-target-modules=q_proj,v_proj",
    ]
    proc = _fedtune("simulate", "--run-dir", str(tmp_path / "r"), *base, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_generate_refuses_a_classification_run(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "config.toml").write_text('task = "classification"\n')
    proc = _fedtune("generate", str(tmp_path), "--prompt", "hi", timeout=120)
    assert proc.returncode == 2
    assert "has `task` = 'classification'; `fedtune generate` needs" in proc.stderr
