"""A finished preference run: sample answers and re-scoring with the stock PEFT adapter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedtune.config import load_toml
from fedtune.resolve import resolve
from fedtune.run.metrics import read_records, weighted_mean
from fedtune.run.rescore import held_out_results
from fedtune.tasks import get_task
from fedtune.tasks.causal_lm.generate import NUM_SAMPLES, load_lm
from fedtune.tasks.causal_lm.generate import write_samples as write_answers
from fedtune.tasks.preference import data as pref_data

__all__ = ["rescore_run", "write_samples"]


def write_samples(run_dir: Path) -> Path:
    """``samples.jsonl``: client 0's first held-out prompts with chosen, rejected, answers."""
    cfg = resolve(load_toml(Path(run_dir) / "config.toml"), wiring=False).config
    fed = cfg.federation
    split = pref_data.preference_split(
        pref_data.load_preferences(cfg.data, seed=fed.seed),
        cfg.data,
        partition_id=0,
        num_partitions=fed.num_clients,
        seed=fed.seed,
    )
    test = split.test
    rows = [
        {"prompt": test.prompts[i], "reference": test.chosen[i], "rejected": test.rejected[i]}
        for i in range(min(NUM_SAMPLES, len(test)))
    ]
    return write_answers(run_dir, rows)


def rescore_run(run_dir: Path) -> dict[str, Any]:
    """Per-client and weighted held-out preference metrics of ``RUN_DIR/adapter``."""
    cfg, model, tokenizer = load_lm(run_dir)
    task = get_task(cfg.model.task)
    results = held_out_results(task, cfg, model, tokenizer)
    clients = {n: {**r.metrics(), "eval-examples": r.num_examples} for n, r in results.items()}
    last = read_records(Path(run_dir) / "metrics.jsonl")[-1]
    out: dict[str, Any] = {"round": last["round"], "clients": clients}
    for key in task.eval_metrics:
        out[key] = weighted_mean([(c[key], int(c["eval-examples"])) for c in clients.values()])
    out["reported-accuracy"] = last.get("eval-accuracy", math.nan)
    return out
