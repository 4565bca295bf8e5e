"""End to end: `fedtune simulate` on a tiny config-built BERT, then `fedtune evaluate`.

Runs the real CLI in a subprocess (Flower simulation engine, Ray backend) and
checks the run directory, that the adapter loads with stock PEFT and reproduces
the reported accuracy, and that no process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import session_processes

ROOT = Path(__file__).resolve().parents[1]


def _fedtune(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a session of its own; afterwards nothing of that session may live.

    Ray's processes stay in the CLI's session, so this checks exactly what this run
    started (other runs on the machine do not count). On a timeout the whole process
    group is killed.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    deadline = time.monotonic() + 15  # let exiting workers finish
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"`fedtune {args[0]}` left processes running: {sorted(left)}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


TRAIN_ARGS = (
    "--set",
    "num-clients=3",
    "--set",
    "num-rounds=6",
    "--set",
    "learning-rate=0.02",
    "--set",
    "batch-size=8",
    "--set",
    "lora-rank=4",
    "--set",
    "local-epochs=4",
)


def _simulate(
    run_dir: Path, model: Path, data: Path, *extra: str, rounds: int = 6
) -> subprocess.CompletedProcess[str]:
    proc = _fedtune(
        "simulate",
        "--run-dir",
        str(run_dir),
        "--set",
        f"model-path={model}",
        "--set",
        f"data-path={data}",
        *TRAIN_ARGS,
        "--set",
        f"num-rounds={rounds}",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"round {rounds}/{rounds}" in proc.stderr
    return proc


@pytest.fixture(scope="module")
def plain_run(
    tiny_model_dir: Path, toy_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    _simulate(run_dir, tiny_model_dir, toy_csv)
    return run_dir


@pytest.fixture(scope="module")
def encrypted_run(
    tiny_model_dir: Path, toy_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run_dir = tmp_path_factory.mktemp("encrypted") / "run"
    _simulate(run_dir, tiny_model_dir, toy_csv, "--set", "encryption=true")
    return run_dir


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_simulation_learns_and_writes_the_run_directory(plain_run: Path) -> None:
    for name in (
        "config.toml",
        "metrics.jsonl",
        "metrics.png",
        "checkpoint/state.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (plain_run / name).is_file(), name
    records = _records(plain_run)
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert all(r["clients-trained"] == 3 for r in records[1:])
    assert set(records[-1]["clients"]) == {"client-0", "client-1", "client-2"}
    assert records[-1]["eval-loss"] < records[0]["eval-loss"] - 0.1
    assert records[-1]["eval-accuracy"] > 0.6  # chance is 1/3


@pytest.mark.slow
def test_adapter_reloads_with_stock_peft_and_reproduces_accuracy(
    plain_run: Path, tiny_model_dir: Path
) -> None:
    ev = _fedtune("evaluate", str(plain_run), "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads(ev.stdout)
    assert report["eval-accuracy"] == pytest.approx(
        _records(plain_run)[-1]["eval-accuracy"], abs=1e-9
    )

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=3, ignore_mismatched_sizes=True
    )
    model = PeftModel.from_pretrained(base, str(plain_run / "adapter"))
    assert any("lora_B" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_encrypted_run_matches_plain_run(plain_run: Path, encrypted_run: Path) -> None:
    plain, enc = _records(plain_run), _records(encrypted_run)
    for p, e in zip(plain, enc, strict=True):
        assert abs(p["eval-accuracy"] - e["eval-accuracy"]) < 0.005
        assert p["eval-loss"] == pytest.approx(e["eval-loss"], abs=1e-4)
    assert (encrypted_run / "keys" / "secret.ctx").stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_no_server_side_file_contains_the_secret_key(encrypted_run: Path) -> None:
    key = (encrypted_run / "keys" / "secret.ctx").read_bytes().split(b"\n", 1)[1]
    windows = [key[i : i + 48] for i in range(0, len(key) - 48, max(1, len(key) // 16))]
    server_files = [
        p
        for p in encrypted_run.rglob("*")
        if p.is_file()
        and "keys" not in p.relative_to(encrypted_run).parts
        and "adapter" not in p.relative_to(encrypted_run).parts
    ]
    assert any(p.parent.name == "checkpoint" for p in server_files)
    for path in server_files:
        data = path.read_bytes()
        assert not any(w in data for w in windows), path


@pytest.mark.slow
def test_export_decrypts_with_the_key_and_refuses_without(
    encrypted_run: Path, tmp_path: Path
) -> None:
    no_key = _fedtune("export", str(encrypted_run), "--out", str(tmp_path / "a"))
    assert no_key.returncode == 2 and "is encrypted: pass --key" in no_key.stderr
    ok = _fedtune(
        "export",
        str(encrypted_run),
        "--key",
        str(encrypted_run / "keys" / "secret.ctx"),
        "--out",
        str(tmp_path / "b"),
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    b = load_file(str(encrypted_run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ["--set", "num-round=3"],
            "Unknown config key 'num-round' (value '3'). Did you mean 'num-rounds'",
        ),
        (
            ["--set", "model-path=/no/such/model"],
            "`model-path` must be a local Hugging Face model directory, got '/no/such/model'",
        ),
        (
            ["--set", "lora-target-modules=query,q_proj"],
            "`lora-target-modules` names 'q_proj', which the model does not have",
        ),
        (["--set", "label-column=category"], "`label-column` is 'category', but"),
        (["--set", "num-clients=40"], "`num-clients` is 40, but the data set has only 30 examples"),
        (["--set", "dirichlet-alpha=0"], "`dirichlet-alpha` must be > 0"),
        (
            ["--set", "dp=client", "--set", "encryption=false"],
            "`dp` = 'client' needs `encryption` = true, got `encryption` = false",
        ),
    ],
)
def test_bad_input_is_one_clear_error(
    args: list[str], match: str, tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    base = [
        "--set",
        f"model-path={tiny_model_dir}",
        "--set",
        f"data-path={toy_csv}",
        "--set",
        "max-examples=30",
    ]
    proc = _fedtune("simulate", "--run-dir", str(tmp_path / "r"), *base, *args, timeout=120)
    assert proc.returncode == 2
    assert match in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_help_is_complete() -> None:
    top = _fedtune("--help")
    assert top.returncode == 0 and "simulate" in top.stdout and "evaluate" in top.stdout
    sim = _fedtune("simulate", "--help")
    for text in (
        "--run-dir",
        "--set",
        "num-rounds = 5",
        "dirichlet-alpha",
        "metrics.jsonl",
        "adapter/",
    ):
        assert text in sim.stdout, text
    assert "RUN_DIR" in _fedtune("evaluate", "--help").stdout


@pytest.fixture(scope="module")
def private_run(
    tiny_model_dir: Path, toy_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run_dir = tmp_path_factory.mktemp("private") / "run"
    proc = _simulate(
        run_dir,
        tiny_model_dir,
        toy_csv,
        "--set",
        "encryption=true",
        "--set",
        "dp=example",
        "--set",
        "target-epsilon=3",
        "--set",
        "label-names=animal,food,tool",
        rounds=3,
    )
    (run_dir.parent / "cli-output.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


@pytest.mark.slow
def test_private_encrypted_run_ledgers_agree_with_metrics_and_audit(private_run: Path) -> None:
    from fedtune.privacy import PrivacyLedger

    records = _records(private_run)
    for r in records[1:]:
        for name, values in r["clients"].items():
            ledger = PrivacyLedger(private_run / "privacy" / f"{name}.jsonl").records()
            entry = next(e for e in ledger if e.round == r["round"])
            assert entry.epsilon == pytest.approx(values["epsilon"], rel=1e-12)
    assert max(r["epsilon"] for r in records[1:]) <= 3.0
    # calibrated to spend the target over the planned rounds and their DP evaluations: the
    # last ledger record (the evaluation of the final state) composes everything
    for name in ("client-0", "client-1", "client-2"):
        last = PrivacyLedger(private_run / "privacy" / f"{name}.jsonl").records()[-1]
        assert last.kind == "eval" and 2.9 <= last.epsilon <= 3.0, last
    audit = _fedtune("audit", str(private_run), "--json", "--no-plot")
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    report = json.loads(audit.stdout)
    assert {c["client"] for c in report["clients"]} == {"client-0", "client-1", "client-2"}
    assert all(c["verdict"] == "ok" for c in report["clients"])
    assert report["delta"] == 1e-5 and "policy.toml" in report["delta_source"]


@pytest.mark.slow
def test_a_dp_run_writes_no_training_statistic_of_any_client(private_run: Path) -> None:
    # Before the fix DP clients sent train-loss and train-seconds in plaintext, and the
    # server logged them and wrote them to metrics.jsonl.
    for record in _records(private_run)[1:]:
        assert "train-loss" not in record
        for values in record["clients"].values():
            assert set(values) <= {"num-examples", "epsilon", "eval-loss", "eval-accuracy",
                                   "eval-examples"}, values  # fmt: skip
            assert "train-loss" not in values and "train-seconds" not in values
    log = (private_run.parent / "cli-output.txt").read_text()
    assert "round 3/3" in log and "epsilon" in log
    assert "train-loss" not in log and "train-seconds" not in log


@pytest.mark.slow
def test_budget_spent_clients_decline_and_run_stops_clearly(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    # sigma fixed by hand: the budget covers 2 of the 6 planned rounds, then clients decline.
    # Replace-one RDP (q = 8/32, 16 steps a round), each round after a DP evaluation at
    # σ_eval = 10 (q = 1, one step): 6.558, 9.339, 11.607 > 10.
    proc = _fedtune(
        "simulate",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"model-path={tiny_model_dir}",
        "--set",
        f"data-path={toy_csv}",
        *TRAIN_ARGS,
        "--set",
        "dp=example",
        "--set",
        "noise-multiplier=2.0",
        "--set",
        "epsilon-budget=10",
        "--set",
        "accountant=rdp",
        "--set",
        "dp-noise=float",  # the float mechanism, accounted by `accountant` (the numbers above)
        "--set",
        "label-names=animal,food,tool",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "stopped: Round" in last and "fewer than `min-clients` = 2" in last
    assert "Round 3:" in last and "declined by client-0: budget-spent" in last
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[-1]["epsilon"] == pytest.approx(9.339, abs=1e-3)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()  # nothing lost


def test_partial_participation_is_the_same_run_for_the_same_seed(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    """Half the clients a round: the same partitions train and evaluate on every run.

    Flower gives simulated nodes random ids; before the simulation driver seeded them,
    sampling among the sorted ids picked other partitions each time.
    """

    def run(name: str) -> list[dict[str, Any]]:
        _simulate(
            tmp_path / name,
            tiny_model_dir,
            toy_csv,
            "--set",
            "num-clients=4",
            "--set",
            "min-clients=1",
            "--set",
            "fraction-train=0.5",
            "--set",
            "fraction-evaluate=0.5",
            "--set",
            "local-epochs=1",
            rounds=2,
        )
        timing = ("seconds",)
        records = [
            json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for record in records:
            for key in [k for k in record if k.endswith(timing)]:
                del record[key]
            for values in record.get("clients", {}).values():
                values.pop("train-seconds", None)
        return records

    first, second = run("a"), run("b")
    assert [sorted(r["clients"]) for r in first][1:] == [sorted(r["clients"]) for r in second][1:]
    assert all(r["clients-trained"] == 2 for r in first[1:])  # really a part of the federation
    assert first == second
