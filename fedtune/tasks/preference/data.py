"""Preference data: (prompt, chosen, rejected) triples, their partitions and their encoding.

Sources
-------
* the bundled default: WordNet 3.0 noun synsets (Debian package ``wordnet-base``,
  WordNet licence: use, copy, modify and distribute freely). The prompt is
  ``Define the word "X".`` for a synset's first lemma; ``examples-per-label``
  synsets are drawn per lexicographer category (so ``dirichlet`` partitions skew
  clients by topic) and ``preference-pairs`` says which answer is preferred:

  - ``"usage-example"`` (default): the chosen answer is X's definition followed by
    its first WordNet usage example (``<definition>. For example: "<example>"``),
    the rejected one the bare definition. A reader of a dictionary prefers the
    answer that shows the word in use; the two answers share every token up to the
    end of the definition, so the preference is exactly "add the example", and
    anyone can check it against WordNet. Only synsets with a usage example are
    drawn (2,034 of the 8 categories' 48,994).
  - ``"sibling"``: the chosen answer is X's own definition, the rejected one the
    definition of a *sibling* (another synset under the same hypernym, drawn with
    the run seed): a close but wrong answer. A synset without a sibling is skipped.
    This preference is specific to each word: measured at the start of training,
    two pairs' DPO gradients are nearly orthogonal (mean cosine 0.0005, against
    0.27 for ``usage-example``), so DP-SGD's noise hides it unless a client holds
    many thousands of pairs (docs/preference.md).
* a ``.csv`` / ``.jsonl`` file or saved HF dataset with ``prompt-column``,
  ``chosen-column`` and ``rejected-column``.

Each answer is encoded exactly as the causal-LM task encodes its answers
(:func:`fedtune.tasks.causal_lm.data.encode_example`: the chat template, labels only
on the answer and its end-of-turn token). One pair is one row: the chosen answer in
``input_ids`` / ``labels``, the rejected one in ``rejected_input_ids`` /
``rejected_labels``, each right-padded by the one collate function, and ``row`` (the
pair's index in its data set: the key of the training loss's reference cache).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune import data as fdata
from fedtune.config import DataConfig
from fedtune.data.collate import pad_collate
from fedtune.errors import ConfigError
from fedtune.tasks.causal_lm.data import encode_example, end_of_turn_ids, table_cell, wordnet_prompt

__all__ = [
    "PreferenceData",
    "PreferenceDataset",
    "PreferenceSplit",
    "load_preferences",
    "preference_split",
    "usage_answer",
    "wordnet_preferences",
]


@dataclass(frozen=True)
class PreferenceData:
    """A whole preference data set; ``groups`` (a topic index) only drives partitioning."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    groups: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, keep: Sequence[int]) -> PreferenceData:
        """The triples at ``keep``, in that order."""
        return PreferenceData(
            [self.prompts[i] for i in keep],
            [self.chosen[i] for i in keep],
            [self.rejected[i] for i in keep],
            [self.groups[i] for i in keep],
        )


@dataclass(frozen=True)
class PreferenceSplit:
    """One client's train and held-out triples."""

    train: PreferenceData
    test: PreferenceData


def wordnet_preferences(cfg: DataConfig, *, seed: int) -> PreferenceData:
    """WordNet triples by ``preference-pairs`` (see the module docstring), seeded."""
    names = fdata.wordnet_categories(cfg, at_least=1)
    synsets = fdata.read_wordnet(Path(cfg.wordnet_dir))
    if cfg.preference_pairs == "usage-example":
        with_example = [s for s in synsets if s.examples]
        drawn = fdata.sample_by_category(cfg, names, seed=seed, synsets=with_example)
        return PreferenceData(
            [wordnet_prompt(s.lemma) for _, s in drawn],
            [usage_answer(s) for _, s in drawn],
            [s.definition for _, s in drawn],
            [group for group, _ in drawn],
        )
    drawn = fdata.sample_by_category(cfg, names, seed=seed, synsets=synsets)
    children: dict[int, list[fdata.Synset]] = defaultdict(list)
    for synset in synsets:
        for parent in synset.hypernyms:
            children[parent].append(synset)
    rng = np.random.default_rng([seed, 0xD9F0])
    prompts: list[str] = []
    chosen: list[str] = []
    rejected: list[str] = []
    groups: list[int] = []
    for group, synset in drawn:
        siblings = [
            other
            for parent in synset.hypernyms
            for other in children[parent]
            if other.offset != synset.offset and other.definition != synset.definition
        ]
        if not siblings:
            continue
        sibling = siblings[int(rng.integers(len(siblings)))]
        prompts.append(wordnet_prompt(synset.lemma))
        chosen.append(synset.definition)
        rejected.append(sibling.definition)
        groups.append(group)
    return PreferenceData(prompts, chosen, rejected, groups)


def usage_answer(synset: fdata.Synset) -> str:
    """A definition with its first usage example: ``<definition>. For example: "<example>"``."""
    return f'{synset.definition}. For example: "{synset.examples[0]}"'


def load_preference_table(cfg: DataConfig) -> PreferenceData:
    """The user's own triples; errors name the missing column key and the file's columns."""
    path = Path(cfg.data_path).expanduser()
    if not path.exists():
        raise ConfigError(f"`data-path` {cfg.data_path!r} does not exist.")
    table = fdata.read_table(path)
    columns = list(table.column_names)
    keys = (
        ("prompt-column", cfg.prompt_column),
        ("chosen-column", cfg.chosen_column),
        ("rejected-column", cfg.rejected_column),
    )
    for key, column in keys:
        if column not in columns:
            raise ConfigError(
                f"`{key}` is {column!r}, but {str(path)!r} has no such column; its columns "
                f"are: {', '.join(columns)}. Preference data needs `prompt-column`, "
                "`chosen-column` and `rejected-column`."
            )
    prompt, good, bad = ([table_cell(v) for v in table[c]] for _, c in keys)
    return PreferenceData(prompt, good, bad, [0] * len(prompt))


def load_preferences(cfg: DataConfig, *, seed: int) -> PreferenceData:
    """The configured preference data, capped at ``max-examples`` (seeded)."""
    if cfg.data_path and cfg.partitioning == "dirichlet":
        raise ConfigError(
            f"`partitioning` is {cfg.partitioning!r}, but preference data from `data-path` "
            "has no labels to skew by; use 'iid'."
        )
    data = load_preference_table(cfg) if cfg.data_path else wordnet_preferences(cfg, seed=seed)
    if cfg.max_examples and len(data) > cfg.max_examples:
        rng = np.random.default_rng(seed)
        data = data.subset(sorted(rng.choice(len(data), cfg.max_examples, replace=False)))
    return data


def preference_split(
    data: PreferenceData, cfg: DataConfig, *, partition_id: int, num_partitions: int, seed: int
) -> PreferenceSplit:
    """One client's partition and held-out split, by the rule every task shares."""
    split = fdata.client_split(
        data.groups,
        cfg,
        partition_id=partition_id,
        num_partitions=num_partitions,
        seed=seed,
        contents=[
            f"{p}\t{w}\t{r}"
            for p, w, r in zip(data.prompts, data.chosen, data.rejected, strict=True)
        ],
    )
    return PreferenceSplit(train=data.subset(split.train), test=data.subset(split.test))


class PreferenceDataset:
    """Encoded pairs; items hold the chosen and the rejected answer of one prompt.

    One item per (prompt, chosen, rejected) record, always: each side is encoded
    and truncated on its own by :func:`fedtune.tasks.causal_lm.data.encode_example`
    (an answer with any token keeps at least one labelled token within
    ``max_length``; an empty answer keeps its end-of-turn token), so ``len`` is the
    number of records and the count a node sends does not depend on what one
    record holds (issue 26).
    """

    def __init__(self, tokenizer: Any, data: PreferenceData, *, max_length: int) -> None:
        stops = end_of_turn_ids(tokenizer)
        self.rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
        self.prompts: list[str] = list(data.prompts)
        for prompt, good, bad in zip(data.prompts, data.chosen, data.rejected, strict=True):
            ids_w, labels_w = encode_example(
                tokenizer, prompt, good, max_length=max_length, stop_ids=stops
            )
            ids_l, labels_l = encode_example(
                tokenizer, prompt, bad, max_length=max_length, stop_ids=stops
            )
            self.rows.append((ids_w, labels_w, ids_l, labels_l))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def lengths(self) -> list[int]:
        """Each pair's longer half in tokens (for length-sorted batches)."""
        return [max(len(row[0]), len(row[2])) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids_w, labels_w, ids_l, labels_l = self.rows[i]
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return {
            "input_ids": as_tensor(ids_w),
            "labels": as_tensor(labels_w),
            "rejected_input_ids": as_tensor(ids_l),
            "rejected_labels": as_tensor(labels_l),
            "row": torch.tensor(i, dtype=torch.long),
        }

    def collate_fn(self):  # type: ignore[no-untyped-def]
        """Pad the chosen and the rejected halves of a batch, each to its longest row."""
        pad = pad_collate(self.pad_id)

        def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            chosen = pad([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])
            rejected = pad(
                [
                    {"input_ids": it["rejected_input_ids"], "labels": it["rejected_labels"]}
                    for it in items
                ]
            )
            rows = {"row": torch.stack([it["row"] for it in items])}
            return {**chosen, **{f"rejected_{k}": v for k, v in rejected.items()}, **rows}

        return collate
