"""Re-score a finished run's adapter, loaded with stock PEFT, on the clients' held-out data.

This is the check that the exported ``adapter/`` *is* the model the federation
reported on: the partitions are rebuilt from ``config.toml`` (same seed, same
splits) and the adapter is loaded with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune import data as fdata
from fedtune.config import ConfigError, load_toml, parse_run_config
from fedtune.export import load_adapter
from fedtune.model import load_tokenizer
from fedtune.run.metrics import read_records, weighted_mean
from fedtune.train import EncodedDataset, evaluate, make_loader, select_device


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """Per-client and weighted accuracy of ``run_dir/adapter``, beside the reported one."""
    run_dir = Path(run_dir)
    for needed in ("config.toml", "adapter", "metrics.jsonl"):
        if not (run_dir / needed).exists():
            raise ConfigError(
                f"{str(run_dir)!r} has no {needed}; is it a finished `fedtune simulate` run?"
            )
    cfg = parse_run_config(load_toml(run_dir / "config.toml"))
    if cfg.model.task == "causal-lm":
        from fedtune.generate import evaluate_lm_run  # noqa: PLC0415

        return evaluate_lm_run(run_dir)
    model = load_adapter(run_dir / "adapter", cfg)
    tokenizer = load_tokenizer(cfg.model)
    device = select_device(cfg.train.device)
    fed = cfg.federation
    dataset = fdata.load_data(cfg.data, seed=fed.seed)
    clients: dict[str, dict[str, float]] = {}
    for pid in range(fed.num_clients):
        split = fdata.client_data(
            dataset, cfg.data, partition_id=pid, num_partitions=fed.num_clients, seed=fed.seed
        )
        test = EncodedDataset(
            tokenizer, split.test_texts, split.test_labels, max_length=cfg.data.max_seq_length
        )
        result = evaluate(model, make_loader(test, batch_size=64, shuffle=False), device=device)
        clients[f"client-{pid}"] = {
            "eval-accuracy": result.accuracy,
            "eval-examples": result.num_examples,
        }
    last = read_records(run_dir / "metrics.jsonl")[-1]
    return {
        "round": last["round"],
        "clients": clients,
        "eval-accuracy": weighted_mean(
            [(c["eval-accuracy"], int(c["eval-examples"])) for c in clients.values()]
        ),
        "reported-accuracy": last.get("eval-accuracy"),
    }
