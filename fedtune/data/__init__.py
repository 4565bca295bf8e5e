"""Data shared by the tasks: sources (WordNet, tables), partitions, collation.

``sources`` reads WordNet and the user's own files, ``partition`` splits examples
over clients with flwr-datasets and makes each client's held-out split, ``collate``
pads batches. What a task makes of the examples (labels, instruction pairs) lives
in its module under :mod:`fedtune.tasks`.
"""

from __future__ import annotations

from fedtune.data.partition import (
    ClientData,
    ClientSplit,
    client_data,
    client_split,
    label_counts,
    partition_indices,
)
from fedtune.data.sources import (
    LABEL,
    TEXT,
    WORDNET_CATEGORIES,
    LabelledData,
    Synset,
    default_label_names,
    load_data,
    load_table,
    load_wordnet,
    read_table,
    read_wordnet,
    sample_by_category,
    wordnet_categories,
    wordnet_definition,
    wordnet_examples,
)

__all__ = [
    "LABEL",
    "TEXT",
    "WORDNET_CATEGORIES",
    "ClientData",
    "ClientSplit",
    "LabelledData",
    "Synset",
    "client_data",
    "client_split",
    "default_label_names",
    "label_counts",
    "load_data",
    "load_table",
    "load_wordnet",
    "partition_indices",
    "read_table",
    "read_wordnet",
    "sample_by_category",
    "wordnet_categories",
    "wordnet_definition",
    "wordnet_examples",
]
