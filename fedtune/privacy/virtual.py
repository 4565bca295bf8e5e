"""Virtual steps: a Poisson batch larger than ``physical-batch-size``, split by length.

DP-SGD wants large expected batches (the signal grows with the batch, the noise
does not), but one forward/backward pass over 1,000 padded rows costs memory for
every per-example gradient and pads every row to the longest one drawn. Opacus'
``BatchSplittingSampler`` (behind its ``BatchMemoryManager``) splits a logical
batch into physical ones and tells the ``DPOptimizer`` to clip and accumulate
without stepping until the logical batch ends; this sampler does the same, and
sorts the logical batch by length first, so that each physical batch pads to
rows of about its own length (on the WordNet definitions: a mean of 16 tokens
against a padded width near 48 for a batch of 1,000).

The step is the same DP-SGD step: every example's gradient is computed and
clipped on its own (no layer mixes rows), the clipped sum of the whole logical
batch gets one noise draw and is divided by the expected batch size, and the
accounting counts one step per logical batch. Only the order in which floats are
added changes. A logical batch no larger than ``max_batch_size`` is passed on
unchanged, in the sampler's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Sampler

__all__ = ["LengthSortedSplitter", "split_by_length"]


class LengthSortedSplitter(Sampler[list[int]]):
    """Split each index list of ``sampler`` into length-sorted chunks of at most ``max_batch_size``.

    ``optimizer`` (a ``DPOptimizer``) is told ``signal_skip_step(True)`` before every
    chunk but the last of a logical batch, so that it steps once per logical batch;
    an empty logical batch is passed on as one empty chunk (its step is pure noise).
    """

    def __init__(
        self,
        *,
        sampler: Any,
        max_batch_size: int,
        optimizer: Any,
        lengths: Sequence[int] | None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {max_batch_size}.")
        self.sampler = sampler
        self.max_batch_size = max_batch_size
        self.optimizer = optimizer
        self.lengths = lengths

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            indices = [int(i) for i in batch]
            if len(indices) <= self.max_batch_size:
                self.optimizer.signal_skip_step(do_skip=False)
                yield indices
                continue
            if self.lengths is not None:
                lengths = self.lengths
                indices.sort(key=lambda i: lengths[i])
            parts = math.ceil(len(indices) / self.max_batch_size)
            size = math.ceil(len(indices) / parts)
            chunks = [indices[k : k + size] for k in range(0, len(indices), size)]
            for chunk in chunks[:-1]:
                self.optimizer.signal_skip_step(do_skip=True)
                yield chunk
            self.optimizer.signal_skip_step(do_skip=False)
            yield chunks[-1]

    def __len__(self) -> int:
        return len(self.sampler)  # logical batches; the physical count is random


def split_by_length(
    loader: DataLoader[Any], *, max_batch_size: int, optimizer: Any, lengths: Sequence[int] | None
) -> DataLoader[Any]:
    """``loader`` (a ``DPDataLoader``), its batches split by :class:`LengthSortedSplitter`."""
    return DataLoader(
        dataset=loader.dataset,
        batch_sampler=LengthSortedSplitter(
            sampler=loader.batch_sampler,
            max_batch_size=max_batch_size,
            optimizer=optimizer,
            lengths=lengths,
        ),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        generator=loader.generator,
    )
