"""Data sources, partitioning across clients and tokenising.

Sources
-------
* the bundled default: WordNet 3.0 noun definitions (Debian package
  ``wordnet-base``) labelled by lexicographer category, 8 categories;
* a ``.csv`` or ``.jsonl`` file with a text and a label column;
* a Hugging Face dataset directory written by ``Dataset.save_to_disk``.

Partitioning uses ``flwr-datasets`` partitioners (``IidPartitioner`` over a
seeded shuffle, ``DirichletPartitioner`` for label skew), and each client keeps
a seeded held-out split of its own partition. Same seed, same partitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config import ConfigError, DataConfig

#: WordNet lexicographer file number -> category name (see ``lexnames(5WN)``).
WORDNET_CATEGORIES: dict[int, str] = {
    5: "animal",
    20: "plant",
    13: "food",
    18: "person",
    6: "artifact",
    15: "location",
    8: "body",
    27: "substance",
}

TEXT = "text"
LABEL = "label"


@dataclass(frozen=True)
class LabelledData:
    """A whole data set: texts, integer labels and the label names."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class ClientData:
    """One client's partition, split into train and held-out test examples."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


def wordnet_definition(gloss: str) -> str:
    """Keep a gloss's definition and drop its quoted usage examples."""
    return gloss.split('; "', 1)[0].strip().strip('"').strip()


def read_wordnet(directory: Path) -> list[tuple[int, str]]:
    """Parse ``data.noun`` into ``(lexicographer file number, definition)`` pairs."""
    path = directory / "data.noun"
    if not path.is_file():
        raise ConfigError(
            f"`wordnet-dir` {str(directory)!r} has no data.noun: install the Debian "
            "package `wordnet-base` (apt-get install wordnet-base), or set `data-path` "
            "to your own CSV/JSONL file."
        )
    out: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split(" ")
            if not sep or len(fields) < 2:
                continue
            out.append((int(fields[1]), wordnet_definition(gloss)))
    return out


def load_wordnet(cfg: DataConfig, *, seed: int) -> LabelledData:
    """WordNet noun definitions, ``examples-per-label`` drawn per category (seeded).

    ``label-names`` may pick a subset of the 8 categories (in the given order).
    """
    by_name = {name: lexfile for lexfile, name in WORDNET_CATEGORIES.items()}
    names = cfg.labels or list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown or len(names) < 2:
        raise ConfigError(
            f"`label-names` is {cfg.label_names!r}; with the WordNet data it must name at "
            f"least 2 of: {', '.join(by_name)}."
        )
    by_category: dict[int, list[str]] = {by_name[n]: [] for n in names}
    for lexfile, definition in read_wordnet(Path(cfg.wordnet_dir)):
        if lexfile in by_category and definition:
            by_category[lexfile].append(definition)
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        pool = by_category[by_name[name]]
        take = len(pool) if cfg.examples_per_label == 0 else min(cfg.examples_per_label, len(pool))
        for i in sorted(rng.choice(len(pool), size=take, replace=False).tolist()):
            texts.append(pool[i])
            labels.append(label)
    return LabelledData(texts, labels, names)


def _read_table(path: Path) -> Any:
    """Load a CSV / JSONL file or a saved HF dataset as a ``datasets.Dataset``."""
    import datasets  # noqa: PLC0415 - heavy import

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(
                f"`data-path` {str(path)!r} is a directory but not a dataset written by "
                f"`Dataset.save_to_disk`: {err}"
            ) from err
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ConfigError(
                    f"`data-path` {str(path)!r} holds splits {list(loaded)}; fedtune needs "
                    "a single Dataset or a 'train' split (clients make their own test split)."
                )
            loaded = loaded["train"]
        return loaded
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return datasets.Dataset.from_csv(str(path))
    if suffix in {".jsonl", ".json"}:
        return datasets.Dataset.from_json(str(path))
    raise ConfigError(
        f"`data-path` {str(path)!r} must be a .csv or .jsonl file or a saved Hugging "
        "Face dataset directory."
    )


def load_table(cfg: DataConfig) -> LabelledData:
    """Load the user's own data set and map its labels to integers."""
    path = Path(cfg.data_path).expanduser()
    if not path.exists():
        raise ConfigError(f"`data-path` {cfg.data_path!r} does not exist.")
    table = _read_table(path)
    for key, column in (("text-column", cfg.text_column), ("label-column", cfg.label_column)):
        if column not in table.column_names:
            raise ConfigError(
                f"`{key}` is {column!r}, but {str(path)!r} has no such column; its "
                f"columns are: {', '.join(table.column_names)}."
            )
    texts = [str(t) for t in table[cfg.text_column]]
    raw = list(table[cfg.label_column])
    if any(v is None for v in raw):
        raise ConfigError(f"Column {cfg.label_column!r} in {str(path)!r} has empty labels.")
    found = {str(v) for v in raw}
    if cfg.labels:
        extra = sorted(found - set(cfg.labels))
        if extra:
            raise ConfigError(
                f"Column {cfg.label_column!r} in {str(path)!r} has labels {extra[:5]} that "
                f"`label-names` ({cfg.label_names!r}) does not list."
            )
        names = cfg.labels
    else:
        names = sorted(found, key=lambda s: (len(s), s) if s.isdigit() else (0, s))
    if len(names) < 2:
        raise ConfigError(
            f"Column {cfg.label_column!r} in {str(path)!r} has {len(names)} distinct "
            "label(s); classification needs at least 2."
        )
    index = {n: i for i, n in enumerate(names)}
    return LabelledData(texts, [index[str(v)] for v in raw], names)


def load_data(cfg: DataConfig, *, seed: int) -> LabelledData:
    """Load the configured data set, capped at ``max-examples`` (seeded)."""
    data = load_wordnet(cfg, seed=seed) if not cfg.data_path else load_table(cfg)
    if cfg.max_examples and len(data) > cfg.max_examples:
        keep = sorted(
            np.random.default_rng(seed).choice(len(data), cfg.max_examples, replace=False)
        )
        data = LabelledData(
            [data.texts[i] for i in keep], [data.labels[i] for i in keep], data.label_names
        )
    return data


def partition_indices(
    labels: list[int], cfg: DataConfig, *, num_partitions: int, seed: int
) -> list[list[int]]:
    """Assign example indices to ``num_partitions`` clients with flwr-datasets.

    Raises
    ------
    ConfigError
        If there are fewer examples than clients, or the Dirichlet split cannot
        give every client at least 2 examples.
    """
    import datasets  # noqa: PLC0415
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner  # noqa: PLC0415

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


def client_data(
    data: LabelledData, cfg: DataConfig, *, partition_id: int, num_partitions: int, seed: int
) -> ClientData:
    """One client's partition with its seeded held-out split."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in [0, {num_partitions}), got {partition_id}.")
    parts = partition_indices(data.labels, cfg, num_partitions=num_partitions, seed=seed)
    idx = np.asarray(parts[partition_id])
    rng = np.random.default_rng([seed, partition_id])
    idx = idx[rng.permutation(len(idx))]
    n_test = min(max(1, round(cfg.test_fraction * len(idx))), len(idx) - 1)
    test, train = idx[:n_test], idx[n_test:]
    return ClientData(
        train_texts=[data.texts[i] for i in train],
        train_labels=[data.labels[i] for i in train],
        test_texts=[data.texts[i] for i in test],
        test_labels=[data.labels[i] for i in test],
    )


def label_counts(labels: list[int], num_labels: int) -> list[int]:
    """Examples per label, for logging a partition's skew."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels).tolist()
