"""End to end: `fedtune simulate` on a tiny config-built BERT, then `fedtune evaluate`.

Runs the real CLI in a subprocess (Flower simulation engine, Ray backend) and
checks the run directory, that the adapter loads with stock PEFT and reproduces
the reported accuracy, and that no process is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ray_or_flower_processes() -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(s in cmd for s in ("raylet", "gcs_server", "ray::", "default_worker.py", "flower-")):
            found.add(int(proc.name))
    return found


def _fedtune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.mark.slow
def test_simulate_then_reload_adapter_with_stock_peft(tiny_model_dir: Path, toy_csv: Path, tmp_path: Path) -> None:
    before = _ray_or_flower_processes()
    run_dir = tmp_path / "run"
    proc = _fedtune(
        "simulate",
        "--run-dir", str(run_dir),
        "--set", f"model-path={tiny_model_dir}",
        "--set", f"data-path={toy_csv}",
        "--set", "num-clients=3",
        "--set", "num-rounds=6",
        "--set", "learning-rate=0.02",
        "--set", "batch-size=8",
        "--set", "lora-rank=4",
        "--set", "local-epochs=4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.toml", "metrics.jsonl", "metrics.png", "checkpoint/state.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert all(r["clients-trained"] == 3 for r in records[1:])
    assert set(records[-1]["clients"]) == {"client-0", "client-1", "client-2"}
    assert records[-1]["eval-loss"] < records[0]["eval-loss"] - 0.1
    assert records[-1]["eval-accuracy"] > 0.6  # chance is 1/3
    assert "round 6/6" in proc.stderr

    # The exported adapter, loaded with stock peft, reproduces the reported accuracy.
    ev = _fedtune("evaluate", str(run_dir), "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads(ev.stdout)
    assert report["eval-accuracy"] == pytest.approx(records[-1]["eval-accuracy"], abs=1e-9)

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=3, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert any("lora_B" in n for n, _ in model.named_parameters())
    assert not (_ray_or_flower_processes() - before), "simulation left processes running"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--set", "num-round=3"], "Unknown config key 'num-round' (value '3'). Did you mean 'num-rounds'"),
        (["--set", "model-path=/no/such/model"], "`model-path` must be a local Hugging Face model directory, got '/no/such/model'"),
        (["--set", "lora-target-modules=query,q_proj"], "`lora-target-modules` names 'q_proj', which the model does not have"),
        (["--set", "label-column=category"], "`label-column` is 'category', but"),
        (["--set", "num-clients=40"], "`num-clients` is 40, but the data set has only 30 examples"),
        (["--set", "dirichlet-alpha=0"], "`dirichlet-alpha` must be > 0"),
    ],
)
def test_bad_input_is_one_clear_error(
    args: list[str], match: str, tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    base = ["--set", f"model-path={tiny_model_dir}", "--set", f"data-path={toy_csv}", "--set", "max-examples=30"]
    proc = _fedtune("simulate", "--run-dir", str(tmp_path / "r"), *base, *args, timeout=120)
    assert proc.returncode == 2
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_help_is_complete() -> None:
    top = _fedtune("--help")
    assert top.returncode == 0 and "simulate" in top.stdout and "evaluate" in top.stdout
    sim = _fedtune("simulate", "--help")
    for text in ("--run-dir", "--set", "num-rounds = 5", "dirichlet-alpha", "metrics.jsonl", "adapter/"):
        assert text in sim.stdout, text
    assert "RUN_DIR" in _fedtune("evaluate", "--help").stdout
