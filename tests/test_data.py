"""Data loading, partitioning (IID, Dirichlet, determinism) and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune import data as fdata
from fedtune.config import ConfigError, DataConfig


def _labels(n_per: int = 50, k: int = 4) -> list[int]:
    return [i % k for i in range(n_per * k)]


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_are_disjoint_cover_everything_and_are_deterministic(partitioning: str) -> None:
    cfg = DataConfig(partitioning=partitioning, dirichlet_alpha=0.5)
    labels = _labels()
    parts = fdata.partition_indices(labels, cfg, num_partitions=5, seed=3)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(labels)))
    assert all(len(p) >= 2 for p in parts)
    assert parts == fdata.partition_indices(labels, cfg, num_partitions=5, seed=3)
    assert parts != fdata.partition_indices(labels, cfg, num_partitions=5, seed=4)


def test_iid_is_balanced_and_dirichlet_is_skewed() -> None:
    labels = _labels(n_per=100, k=4)
    iid = fdata.partition_indices(labels, DataConfig(), num_partitions=4, seed=0)
    assert {len(p) for p in iid} == {100}
    skewed = fdata.partition_indices(
        labels, DataConfig(partitioning="dirichlet", dirichlet_alpha=0.1), num_partitions=4, seed=0
    )

    def top_share(parts: list[list[int]]) -> float:
        shares = [max(fdata.label_counts([labels[i] for i in p], 4)) / len(p) for p in parts]
        return float(np.mean(shares))

    assert top_share(iid) < 0.45  # about 1/4 per label
    assert top_share(skewed) > 0.6  # one label dominates each client


def test_more_clients_than_examples_is_a_clear_error() -> None:
    with pytest.raises(
        ConfigError, match=r"`num-clients` is 30, but the data set has only 20 examples"
    ):
        fdata.partition_indices(_labels(5, 4), DataConfig(), num_partitions=30, seed=0)


def test_client_split_is_seeded_and_holds_out_test_examples() -> None:
    data = fdata.LabelledData([f"t{i}" for i in range(100)], _labels(25, 4), ["a", "b", "c", "d"])
    cfg = DataConfig(test_fraction=0.2)
    a = fdata.client_data(data, cfg, partition_id=1, num_partitions=4, seed=9)
    b = fdata.client_data(data, cfg, partition_id=1, num_partitions=4, seed=9)
    assert a == b
    assert len(a.test_texts) == 5 and len(a.train_texts) == 20
    assert not set(a.test_texts) & set(a.train_texts)
    with pytest.raises(ConfigError, match=r"partition-id must be in \[0, 4\), got 4"):
        fdata.client_data(data, cfg, partition_id=4, num_partitions=4, seed=9)


def test_csv_and_jsonl_with_named_columns(toy_csv: Path, toy_jsonl: Path) -> None:
    csv = fdata.load_data(DataConfig(data_path=str(toy_csv)), seed=0)
    assert len(csv) == 120 and csv.label_names == ["animal", "food", "tool"]
    jsonl = fdata.load_data(
        DataConfig(data_path=str(toy_jsonl), text_column="sentence", label_column="topic"), seed=0
    )
    assert jsonl.label_names == csv.label_names and sorted(jsonl.texts) == sorted(csv.texts)
    capped = fdata.load_data(DataConfig(data_path=str(toy_csv), max_examples=10), seed=0)
    assert len(capped) == 10


def test_hf_dataset_on_disk(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y", "z", "w"], "label": [0, 1, 0, 1]}).save_to_disk(
        str(tmp_path / "ds")
    )
    data = fdata.load_data(DataConfig(data_path=str(tmp_path / "ds")), seed=0)
    assert data.labels == [0, 1, 0, 1] and data.label_names == ["0", "1"]


def test_label_names_fix_the_order_and_reject_unknown_labels(toy_csv: Path) -> None:
    data = fdata.load_data(
        DataConfig(data_path=str(toy_csv), label_names="tool,food,animal"), seed=0
    )
    assert data.label_names == ["tool", "food", "animal"]
    with pytest.raises(ConfigError, match=r"has labels \['tool'\] that `label-names`"):
        fdata.load_data(DataConfig(data_path=str(toy_csv), label_names="animal,food"), seed=0)


def test_missing_label_column_names_key_value_and_columns(toy_csv: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"`label-column` is 'category', but .* has no such column; "
        r"its columns are: text, label",
    ):
        fdata.load_data(DataConfig(data_path=str(toy_csv), label_column="category"), seed=0)


def test_bad_data_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`data-path` '/no/such.csv' does not exist"):
        fdata.load_data(DataConfig(data_path="/no/such.csv"), seed=0)
    other = tmp_path / "data.parquet"
    other.write_text("x")
    with pytest.raises(ConfigError, match=r"must be a .csv or .jsonl file"):
        fdata.load_data(DataConfig(data_path=str(other)), seed=0)
    with pytest.raises(ConfigError, match=r"`wordnet-dir` '/nowhere' has no data.noun: install"):
        fdata.load_data(DataConfig(wordnet_dir="/nowhere"), seed=0)


def test_wordnet_definition_drops_examples() -> None:
    gloss = 'a domesticated carnivorous mammal; "the dog barked all night"  \n'
    assert fdata.wordnet_definition(gloss) == "a domesticated carnivorous mammal"


def test_wordnet_default_is_balanced_over_8_categories() -> None:
    data = fdata.load_data(DataConfig(examples_per_label=30), seed=0)
    assert data.label_names == [
        "animal",
        "plant",
        "food",
        "person",
        "artifact",
        "location",
        "body",
        "substance",
    ]
    assert fdata.label_counts(data.labels, 8) == [30] * 8
    assert data == fdata.load_data(DataConfig(examples_per_label=30), seed=0)
    sub = fdata.load_data(DataConfig(examples_per_label=5, label_names="food,plant"), seed=0)
    assert sub.label_names == ["food", "plant"] and len(sub) == 10
    with pytest.raises(ConfigError, match=r"must name at least 2 of: animal, plant"):
        fdata.load_data(DataConfig(label_names="food,cars"), seed=0)
