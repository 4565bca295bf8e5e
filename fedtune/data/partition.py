"""Partitioning across clients and each client's held-out split (one rule for every task).

Partitioning uses ``flwr-datasets`` partitioners (``IidPartitioner`` over a
seeded shuffle, ``DirichletPartitioner`` for skew by label or topic group), and
each client holds out the examples of its partition whose contents hash lowest
(:func:`client_split`): the partition follows the run seed, the held-out split only
the data and the node's ``test-fraction``. Tasks call :func:`client_split` with their
examples' groups and contents and pick their own examples by the returned indices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtune.config import DataConfig
from fedtune.data.memo import process_memo
from fedtune.data.sources import LABEL, LabelledData
from fedtune.errors import ConfigError

__all__ = [
    "ClientData",
    "ClientSplit",
    "client_data",
    "client_split",
    "held_out_count",
    "held_out_order",
    "label_counts",
    "partition_indices",
]


@dataclass(frozen=True)
class ClientSplit:
    """Indices into the whole data set of one client's train and held-out examples."""

    train: list[int]
    test: list[int]


@dataclass(frozen=True)
class ClientData:
    """One client's partition, split into train and held-out test examples."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


def _partition_key(
    labels: list[int], cfg: DataConfig, *, num_partitions: int, seed: int
) -> tuple[object, ...]:
    return (tuple(labels), cfg.partitioning, cfg.dirichlet_alpha, num_partitions, seed)


@process_memo(_partition_key, maxsize=4)
def partition_indices(
    labels: list[int], cfg: DataConfig, *, num_partitions: int, seed: int
) -> list[list[int]]:
    """Assign example indices to ``num_partitions`` clients with flwr-datasets.

    Computed once per process for a data set and split (:mod:`fedtune.data.memo`):
    the partitioner works out every partition, so per client it would cost
    ``O(num-clients)``. Callers must not modify the returned lists.

    Raises
    ------
    ConfigError
        If there are fewer examples than clients, or the Dirichlet split cannot
        give every client at least 2 examples.
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if len(labels) < 2 * num_partitions:
        raise ConfigError(
            f"`num-clients` is {num_partitions}, but the data set has only {len(labels)} "
            "examples; every client needs at least 2 (one to train, one to test). Use "
            "fewer clients or more data."
        )
    table = datasets.Dataset.from_dict({"index": list(range(len(labels))), LABEL: labels})
    if cfg.partitioning == "iid":
        table = table.shuffle(seed=seed)
        partitioner: Any = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            alpha=cfg.dirichlet_alpha,
            min_partition_size=2,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        return [list(partitioner.load_partition(i)["index"]) for i in range(num_partitions)]
    except ValueError as err:
        raise ConfigError(
            f"Could not split {len(labels)} examples over {num_partitions} clients with "
            f"`dirichlet-alpha` = {cfg.dirichlet_alpha}: {err}"
        ) from err


def held_out_order(contents: Sequence[str]) -> NDArray[np.int64]:
    """Indices of ``contents`` in the order they are held out: by SHA-256 of each content.

    The order depends on the examples alone (ties, i.e. duplicates, by position), not on
    any seed: the first ``n_test`` of a node's examples are its held-out split.
    """
    digests = [hashlib.sha256(text.encode("utf-8")).digest() for text in contents]
    return np.asarray(sorted(range(len(contents)), key=lambda i: (digests[i], i)), dtype=np.int64)


def held_out_count(num_examples: int, test_fraction: float) -> int:
    """``n_test = round(f n)``, at least 1 and leaving at least 1 to train on.

    A function of the public ``n`` and the node's own ``test-fraction`` only, so the
    held-out count is public under the replace-one relation.
    """
    return min(max(1, round(test_fraction * num_examples)), num_examples - 1)


def client_split(
    groups: list[int],
    cfg: DataConfig,
    *,
    partition_id: int,
    num_partitions: int,
    seed: int,
    contents: Sequence[str],
) -> ClientSplit:
    """One client's partition of examples with these ``groups`` and its held-out split.

    The partition (which examples a simulated client holds) follows the run ``seed``;
    the held-out split within it does not: it is the ``round(test-fraction · n)``
    examples of the partition whose content (``contents[i]``: the example's text and
    label, or prompt and answers) hashes lowest (:func:`held_out_order`). So a node's
    held-out examples are the same in every run and under every seed, an example is
    never trained on in one run and evaluated in another, and only the node's own
    ``test-fraction`` chooses how many there are (every task splits here).
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in [0, {num_partitions}), got {partition_id}.")
    if len(contents) != len(groups):
        raise ValueError(
            f"`contents` must hold one entry per example ({len(groups)}), got {len(contents)}."
        )
    parts = partition_indices(groups, cfg, num_partitions=num_partitions, seed=seed)
    idx = np.sort(np.asarray(parts[partition_id], dtype=np.int64))
    idx = idx[held_out_order([contents[int(i)] for i in idx])]
    n_test = held_out_count(len(idx), cfg.test_fraction)
    return ClientSplit(
        train=sorted(int(i) for i in idx[n_test:]), test=sorted(int(i) for i in idx[:n_test])
    )


def client_data(
    data: LabelledData, cfg: DataConfig, *, partition_id: int, num_partitions: int, seed: int
) -> ClientData:
    """One client's labelled texts with its held-out split (see :func:`client_split`)."""
    split = client_split(
        data.labels,
        cfg,
        partition_id=partition_id,
        num_partitions=num_partitions,
        seed=seed,
        contents=[f"{label}\t{text}" for text, label in zip(data.texts, data.labels, strict=True)],
    )
    return ClientData(
        train_texts=[data.texts[i] for i in split.train],
        train_labels=[data.labels[i] for i in split.train],
        test_texts=[data.texts[i] for i in split.test],
        test_labels=[data.labels[i] for i in split.test],
    )


def label_counts(labels: list[int], num_labels: int) -> list[int]:
    """Examples per label, for logging a partition's skew."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels).tolist()
