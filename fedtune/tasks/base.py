"""The one protocol every task implements, and what a task hands the rest of fedtune.

A *task* is what is being learned: the base model it loads, the data a client
holds, the loss, the held-out evaluation and its metric names, and what a finished
run writes. The client, the driver, the export and the re-scoring code call a
:class:`Task` and never ask which one they got (STYLE.md rule 15). A new task is one
module implementing this protocol plus one :func:`fedtune.tasks.register_task` call;
:class:`TaskBase` gives every method but the data a default, so a new task is its
data, its loss and its metrics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from fedtune.config import ModelConfig, RunConfig
    from fedtune.train import Batchable, EvalResult, LossFn

__all__ = [
    "HELD_OUT_METRICS",
    "ClientDatasets",
    "Headline",
    "MetricRange",
    "Task",
    "TaskBase",
]

#: ``(low, high, as words)``: the range the server accepts for one reported metric.
MetricRange = tuple[float, float, str]

#: The held-out metrics both built-in tasks report (loss, and accuracy per example or
#: per answer token); a task with other metrics declares its own.
HELD_OUT_METRICS: Mapping[str, MetricRange] = {
    "eval-loss": (0.0, math.inf, "finite and >= 0"),
    "eval-accuracy": (0.0, 1.0, "in [0, 1]"),
}


@dataclass(frozen=True)
class ClientDatasets:
    """One client's tokenised train and held-out data and the label order it uses."""

    train_set: Batchable
    test_set: Batchable
    #: The classifier's label names in head order; empty for tasks without labels.
    label_names: list[str]


@dataclass(frozen=True)
class Headline:
    """The metric a run is judged by: its record key, plot title and plot range."""

    key: str
    title: str
    #: ``(low, high)`` for the plot's y axis; None lets matplotlib choose.
    ylim: tuple[float, float] | None = None


class Task(Protocol):
    """What one kind of fine-tuning needs from fedtune and gives back to it."""

    #: Registered name, the value of the config key ``task``.
    name: str
    #: PEFT's ``TaskType`` name for the LoRA config (``"SEQ_CLS"``, ``"CAUSAL_LM"``).
    peft_task_type: str
    #: Whether ``label-names`` sizes the model (a classifier head) and the payload.
    uses_labels: bool
    #: Whether ``fedtune generate`` can answer prompts with this task's models.
    generative: bool
    #: The headline held-out metric of the records, the console and the plot.
    headline: Headline
    #: Every held-out metric a client reports (``EvalResult.metrics()`` keys), with the
    #: range the server accepts; each is declared "held-out" in ``fedtune/messages.py``.
    eval_metrics: Mapping[str, MetricRange]

    def default_model_path(self) -> Path:
        """The bundled base model used when ``model-path`` is empty."""
        ...

    def check_model_path(self, cfg: ModelConfig, path: Path) -> None:
        """Raise a ``ConfigError`` if the model at ``path`` cannot serve this task."""
        ...

    def load_base_model(self, path: Path, *, num_labels: int, seed: int) -> nn.Module:
        """The frozen base model (with a new ``num_labels`` head where the task has one)."""
        ...

    def preflight(self, cfg: RunConfig) -> RunConfig:
        """Check model, data and partitions before any process starts; resolve labels."""
        ...

    def client_datasets(
        self, cfg: RunConfig, tokenizer: Any, *, partition_id: int, num_partitions: int
    ) -> ClientDatasets:
        """Load, partition, split and tokenise one client's data."""
        ...

    def loss_fn(self, cfg: RunConfig) -> LossFn | None:
        """``loss_fn(model, batch)``, a mean over rows; None uses the model's own loss."""
        ...

    def evaluate(
        self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device, cfg: RunConfig
    ) -> EvalResult:
        """Held-out metrics over ``loader``; ``metrics()`` has the ``eval_metrics`` keys."""
        ...

    def example_metrics(
        self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device, cfg: RunConfig
    ) -> Mapping[str, Sequence[float]]:
        """Each ``eval_metrics`` key -> one value per held-out example, for a DP evaluation.

        :mod:`fedtune.privacy.evaluation` clips each value to its per-example bound,
        sums and noises; a task without it can only evaluate exactly (``evaluation =
        "exact"`` in the node policy).
        """
        ...

    def derive_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add the metrics computed from the reported ones (e.g. perplexity) to a record."""
        ...

    def finish_run(self, run_dir: Path) -> None:
        """What the key holder writes once ``run_dir/adapter`` exists (e.g. samples)."""
        ...

    def rescore(self, run_dir: Path, cfg: RunConfig) -> Mapping[str, Any]:
        """Re-score ``run_dir/adapter`` (stock PEFT) on every client's held-out split."""
        ...


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
        from fedtune.model.loading import default_model_path  # noqa: PLC0415

        return default_model_path()

    def check_model_path(self, cfg: ModelConfig, path: Path) -> None:
        """Any encoder ``AutoModelForSequenceClassification`` can load will do."""

    def load_base_model(self, path: Path, *, num_labels: int, seed: int) -> nn.Module:
        """The frozen encoder with a new, seeded ``num_labels`` head."""
        import transformers  # noqa: PLC0415 - heavy import
        from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

        from fedtune.model.loading import seeded  # noqa: PLC0415

        verbosity = transformers.logging.get_verbosity()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()  # the head is new by design: no warning
        transformers.utils.logging.disable_progress_bar()
        try:
            with seeded(seed), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # A checkpoint may carry a head of another size: fedtune always trains its own.
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(path), num_labels=num_labels, ignore_mismatched_sizes=True
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
        import torch  # noqa: PLC0415

        from fedtune.train import EvalResult  # noqa: PLC0415

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
        import torch  # noqa: PLC0415
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
        from fedtune.model import load_tokenizer  # noqa: PLC0415
        from fedtune.run.export import load_adapter  # noqa: PLC0415
        from fedtune.run.metrics import read_records, weighted_mean  # noqa: PLC0415
        from fedtune.run.rescore import held_out_results  # noqa: PLC0415

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
