"""A task with defaults: subclass :class:`TaskBase` and give it data (and what differs).

The :class:`~fedtune.tasks.base.Task` protocol has eleven methods; most tasks share
most of them. :class:`TaskBase` implements every one but the data as a sequence
classifier would, so a new task is its data, its loss and its metrics
(``tests/test_extending.py`` writes one in 20 lines). The built-in classification
task is ``TaskBase`` plus its WordNet data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.model import load_tokenizer
from fedtune.model.loading import default_model_path, seeded
from fedtune.model.quantize import quantized_load_kwargs
from fedtune.run.export import load_adapter
from fedtune.run.metrics import read_records, weighted_mean
from fedtune.run.rescore import held_out_results
from fedtune.tasks.base import HELD_OUT_METRICS, ClientDatasets, Headline, MetricRange
from fedtune.train import EvalResult

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from fedtune.config import ModelConfig, RunConfig
    from fedtune.config.model import BaseQuantization
    from fedtune.train import EvalResult

__all__ = ["TaskBase"]


class TaskBase:
    """A task with defaults: subclass it and give the data (and what differs).

    A new task is its data (:meth:`client_datasets`, and :meth:`preflight` to check
    it and fix ``label-names``), its loss (:meth:`loss_fn`) and its metrics
    (:attr:`eval_metrics`, :meth:`evaluate`, :meth:`example_metrics`,
    :meth:`derive_metrics`). Everything else defaults to a sequence classifier: a new,
    seeded head on the bundled MiniLM-L6 encoder (any encoder
    ``AutoModelForSequenceClassification`` loads), the model's own cross-entropy, held-out
    loss and accuracy (also per example, so a DP evaluation works), no preflight
    check, nothing derived, nothing written beyond the adapter, and a re-score of the
    adapter's accuracy on every client's held-out split.
    """

    #: Registered name, the value of the config key ``task`` (a subclass sets it).
    name: str = ""
    peft_task_type = "SEQ_CLS"
    uses_labels = True
    generative = False
    headline = Headline("eval-accuracy", "held-out accuracy", (0.0, 1.0))
    eval_metrics: Mapping[str, MetricRange] = HELD_OUT_METRICS

    def preflight(self, cfg: RunConfig) -> RunConfig:
        """No check beyond the config's own; ``cfg`` as it is."""
        return cfg

    def client_datasets(
        self, cfg: RunConfig, tokenizer: Any, *, partition_id: int, num_partitions: int
    ) -> ClientDatasets:
        """Load, partition, split and tokenise one client's data (every task has its own)."""
        raise NotImplementedError(f"task {self.name!r} must define client_datasets().")

    def default_model_path(self) -> Path:
        """The bundled MiniLM-L6 encoder directory."""

        return default_model_path()

    def check_model_path(self, cfg: ModelConfig, path: Path) -> None:
        """Any encoder ``AutoModelForSequenceClassification`` can load will do."""

    def load_base_model(
        self, path: Path, *, num_labels: int, seed: int, quantization: BaseQuantization = "none"
    ) -> nn.Module:
        """The frozen encoder with a new, seeded ``num_labels`` head (quantised as it loads)."""
        import transformers  # heavy import
        from transformers import AutoModelForSequenceClassification

        verbosity = transformers.logging.get_verbosity()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()  # the head is new by design: no warning
        transformers.utils.logging.disable_progress_bar()
        try:
            with seeded(seed), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # A checkpoint may carry a head of another size: fedtune always trains its own.
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(path),
                    num_labels=num_labels,
                    ignore_mismatched_sizes=True,
                    **quantized_load_kwargs(quantization),
                )
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()
        return model

    def loss_fn(self, cfg: RunConfig) -> None:
        """None: the model's own cross-entropy (a mean over rows)."""
        return None

    def evaluate(
        self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device, cfg: RunConfig
    ) -> EvalResult:
        """Mean cross-entropy and accuracy over ``loader``."""
        import torch

        model.to(device).eval()
        total, correct, seen = 0.0, 0, 0
        with torch.no_grad():
            for raw in loader:
                batch = {k: v.to(device) for k, v in raw.items()}
                out = model(**batch)
                n = len(batch["labels"])
                total += float(out.loss) * n
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                seen += n
        if not seen:
            return EvalResult(loss=math.nan, accuracy=math.nan, num_examples=0)
        return EvalResult(loss=total / seen, accuracy=correct / seen, num_examples=seen)

    def example_metrics(
        self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device, cfg: RunConfig
    ) -> dict[str, list[float]]:
        """Per-example cross-entropy and correctness (for a DP evaluation)."""
        import torch
        from torch.nn import functional as F  # noqa: N812, PLC0415

        model.to(device).eval()
        losses: list[float] = []
        correct: list[float] = []
        with torch.no_grad():
            for raw in loader:
                batch = {k: v.to(device) for k, v in raw.items()}
                logits = model(**batch).logits.double()
                losses += F.cross_entropy(logits, batch["labels"], reduction="none").tolist()
                correct += (logits.argmax(-1) == batch["labels"]).double().tolist()
        return {"eval-loss": losses, "eval-accuracy": correct}

    def derive_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        """Nothing to derive: the reported metrics are kept as they are."""
        return record

    def finish_run(self, run_dir: Path) -> None:
        """Nothing beyond the adapter."""

    def rescore(self, run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
        """Per-client and weighted accuracy of ``run_dir/adapter`` beside the reported one."""

        model = load_adapter(run_dir / "adapter", cfg)
        results = held_out_results(self, cfg, model, load_tokenizer(cfg.model))
        clients = {
            name: {"eval-accuracy": r.accuracy, "eval-examples": r.num_examples}
            for name, r in results.items()
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
