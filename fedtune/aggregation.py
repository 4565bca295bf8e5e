"""Aggregation maths: clients pre-scale, the server only adds, clients divide.

FedAvg (McMahan et al., https://arxiv.org/abs/1602.05629) weights client ``k``'s
adapter ``w_k`` by its example count ``n_k``::

    w = sum_k n_k w_k / sum_k n_k

Each client sends ``n_k w_k`` and ``n_k``; the server keeps the running sums
``S = sum_k n_k w_k`` and ``N = sum_k n_k`` and never divides, so the same code
works when ``n_k w_k`` is a CKKS ciphertext the server cannot read. A key holder
computes ``w = S / N``.

With standard LoRA the ``A`` and ``B`` matrices are averaged separately (the mean
of products ``B_k A_k`` is not the product of means). With FFA-LoRA (Sun et al.,
ICLR 2024) every client shares the frozen ``A``, only ``B`` travels, and the mean
of ``B_k`` times ``A`` is exactly the mean of the clients' updates ``B_k A``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedtune.errors import AggregationError


@dataclass(frozen=True)
class WeightedSum:
    """The server-side state: ``S = sum n_k w_k`` and ``N = sum n_k``."""

    total: NDArray[np.float64]
    num_examples: int

    def mean(self) -> NDArray[np.float64]:
        """``S / N``: the FedAvg weighted mean (only a key holder can do this)."""
        if self.num_examples <= 0:
            raise AggregationError(f"Cannot average over {self.num_examples} examples.")
        return self.total / self.num_examples


def prescale(vector: NDArray[np.floating], num_examples: int) -> NDArray[np.float64]:
    """``n_k w_k``: what a client sends."""
    if num_examples < 1:
        raise AggregationError(f"num_examples must be >= 1, got {num_examples}.")
    return np.asarray(vector, dtype=np.float64) * float(num_examples)


def add_updates(updates: Sequence[tuple[NDArray[np.floating], int]]) -> WeightedSum:
    """Sum pre-scaled plaintext updates ``(n_k w_k, n_k)``."""
    if not updates:
        raise AggregationError("No updates to aggregate.")
    length = updates[0][0].shape
    total = np.zeros(length, dtype=np.float64)
    count = 0
    for i, (vec, n) in enumerate(updates):
        if vec.shape != length:
            raise AggregationError(f"Update {i} has shape {vec.shape}, expected {length}.")
        if n < 1:
            raise AggregationError(f"Update {i} reports {n} examples; expected >= 1.")
        total += vec
        count += int(n)
    return WeightedSum(total=total, num_examples=count)
