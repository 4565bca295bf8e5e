"""Re-score a finished run's adapter, loaded with stock PEFT, on the clients' held-out data.

This is the check that the exported ``adapter/`` *is* the model the federation
reported on: the partitions are rebuilt from ``config.toml`` (same seed, same
splits) and the adapter is loaded with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import load_toml
from fedtune.errors import ConfigError
from fedtune.resolve import resolve
from fedtune.tasks import get_task
from fedtune.train import make_loader, select_device

if TYPE_CHECKING:
    from torch import nn

    from fedtune.config import RunConfig
    from fedtune.tasks.base import Task


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """Per-client and weighted held-out metrics of ``run_dir/adapter``, beside the reported ones."""
    run_dir = Path(run_dir)
    for needed in ("config.toml", "adapter", "metrics.jsonl"):
        if not (run_dir / needed).exists():
            raise ConfigError(
                f"{str(run_dir)!r} has no {needed}; is it a finished `fedtune simulate` run?"
            )
    cfg = resolve(load_toml(run_dir / "config.toml"), wiring=False).config
    return dict(get_task(cfg.model.task).rescore(run_dir, cfg))


def held_out_results(
    task: Task, cfg: RunConfig, model: nn.Module, tokenizer: Any
) -> dict[str, Any]:
    """``client-k`` -> the task's :class:`~fedtune.train.EvalResult` of ``model`` on its test split.

    The partitions are rebuilt from ``cfg`` exactly as the clients built them.
    """
    device = select_device(cfg.train.device)
    results: dict[str, Any] = {}
    for pid in range(cfg.federation.num_clients):
        sets = task.client_datasets(
            cfg, tokenizer, partition_id=pid, num_partitions=cfg.federation.num_clients
        )
        loader = make_loader(sets.test_set, batch_size=64, shuffle=False, by_length=True)
        results[f"client-{pid}"] = task.evaluate(model, loader, device=device, cfg=cfg)
    return results
