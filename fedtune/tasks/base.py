"""The one protocol every task implements, and what a task hands the rest of fedtune.

A *task* is what is being learned: the base model it loads, the data a client
holds, the loss, the held-out evaluation and its metric names, and what a finished
run writes. The client, the driver, the export and the re-scoring code call a
:class:`Task` and never ask which one they got (STYLE.md rule 15). A new task is one
module implementing this protocol plus one :func:`fedtune.tasks.register_task` call;
:class:`fedtune.tasks.defaults.TaskBase` gives every method but the data a default,
so a new task is its data, its loss and its metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from fedtune.config import ModelConfig, RunConfig
    from fedtune.config.model import BaseQuantization
    from fedtune.train import Batchable, EvalResult, LossFn

__all__ = [
    "HELD_OUT_METRICS",
    "ClientDatasets",
    "Headline",
    "MetricRange",
    "Task",
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

    def load_base_model(
        self, path: Path, *, num_labels: int, seed: int, quantization: BaseQuantization = "none"
    ) -> nn.Module:
        """The frozen base model (with a new ``num_labels`` head where the task has one).

        ``quantization``: pass :func:`fedtune.model.quantize.quantized_load_kwargs` of it
        to ``from_pretrained``, so that layers are quantised as they load (a loader that
        ignores it still works: the caller quantises the float model afterwards).
        """
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
