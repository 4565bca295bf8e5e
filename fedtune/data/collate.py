"""One collate function for every task: right-pad a batch to its longest row.

Items are unpadded 1-D ``input_ids`` with either one label each (classification:
a 0-d tensor, stacked) or one label per token (causal LM: a 1-D tensor, padded
with :data:`IGNORE`, which ``cross_entropy`` skips). Padding per batch, not to a
fixed length, keeps short WordNet definitions cheap on CPU.
"""

from __future__ import annotations

import torch

__all__ = ["IGNORE", "item_lengths", "pad_collate"]

#: Label value that ``torch.nn.functional.cross_entropy`` ignores.
IGNORE = -100


def pad_collate(pad_id: int):  # type: ignore[no-untyped-def]
    """Collate unpadded items into right-padded ``input_ids``, ``attention_mask``, ``labels``."""

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max((len(it["input_ids"]) for it in items), default=1)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = it["input_ids"]
            mask[row, :n] = 1
        if not items:
            labels = torch.zeros(0, dtype=torch.long)
        elif items[0]["labels"].dim() == 0:  # one label per example
            labels = torch.stack([it["labels"] for it in items])
        else:  # one label per token
            labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
            for row, it in enumerate(items):
                labels[row, : len(it["labels"])] = it["labels"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def item_lengths(data: object) -> list[int] | None:
    """Each item's token count from the dataset's ``lengths()``, or None if it has none.

    For length-sorted batches: held-out evaluation (:func:`fedtune.train.make_loader`)
    and the parts of a large DP-SGD batch (:mod:`fedtune.privacy.virtual`).
    """
    lengths = getattr(data, "lengths", None)
    return list(lengths()) if callable(lengths) else None
