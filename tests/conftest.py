"""Shared fixtures: a tiny config-built BERT (random init) and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORDS = {
    "animal": ["dog", "cat", "horse", "bird", "fish", "wolf"],
    "food": ["bread", "soup", "cheese", "apple", "rice", "cake"],
    "tool": ["hammer", "saw", "drill", "wrench", "knife", "spade"],
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT built from a config, with the bundled MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedtune.model import default_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def toy_rows(n_per_label: int = 20, seed: int = 0) -> list[dict[str, str]]:
    """Short texts whose label is given away by a keyword: learnable by a tiny model."""
    import random

    rng = random.Random(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(n_per_label):
            w = rng.choice(words)
            rows.append(
                {
                    "text": f"a {w} that is {rng.choice(['big', 'small', 'red', 'old'])}",
                    "label": label,
                }
            )
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV file with `text` and `label` columns (3 labels, 120 rows)."""
    import csv

    path = tmp_path_factory.mktemp("toy") / "toy.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(toy_rows(40))
    return path


@pytest.fixture
def toy_jsonl(tmp_path: Path) -> Path:
    """The same rows as JSON lines with other column names (`sentence`, `topic`)."""
    path = tmp_path / "toy.jsonl"
    with path.open("w") as fh:
        for row in toy_rows(40):
            fh.write(json.dumps({"sentence": row["text"], "topic": row["label"]}) + "\n")
    return path
