"""Instruction data for causal-LM tuning: sources, partitions, chat formatting, answer masks.

Sources
-------
* the bundled default: WordNet 3.0 noun glosses as instruction pairs,
  ``Define the word "X".`` -> the gloss's definition (Debian package
  ``wordnet-base``, WordNet licence: use, copy, modify and distribute freely),
  ``examples-per-label`` drawn per lexicographer category so the ``dirichlet``
  partitioner can skew clients by topic;
* a ``.csv`` / ``.jsonl`` file or saved HF dataset with ``prompt-column`` and
  ``answer-column``, or with only ``text-column`` (plain text: every token is an
  answer token).

Formatting and the mask
-----------------------
With a chat template (SmolLM2's is ChatML with a default system message), an
example is rendered twice: the prompt alone with the generation prompt
(``<|im_start|>assistant\\n``), and prompt plus answer. The prompt text is
tokenised on its own and the rest (answer, end-of-turn) on its own, so the
boundary is exact and matches what the model sees at generation time. Labels are
``-100`` for the system text, the prompt and the generation prompt, and for
anything after the answer's end-of-turn token; the answer tokens and the
end-of-turn token (so the model learns to stop) keep their ids. Without a chat
template the prompt is followed by a space, the answer and ``eos``.

Padding, not packing: examples are short (WordNet: about 50 tokens with the
template) and of varied length, and DP-SGD needs one example per row (Poisson
sampling and per-example clipping are per row), so batches are right-padded to
their longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedtune import data as fdata
from fedtune.config import DataConfig
from fedtune.data.collate import IGNORE, pad_collate
from fedtune.data.memo import data_key, process_memo
from fedtune.errors import ConfigError


@dataclass(frozen=True)
class InstructionData:
    """A whole instruction data set; ``groups`` (a topic index) only drives partitioning."""

    prompts: list[str]
    answers: list[str]
    groups: list[int]
    plain_text: bool = False

    def __len__(self) -> int:
        return len(self.answers)


@dataclass(frozen=True)
class InstructionSplit:
    """One client's partition: train and held-out (prompt, answer) pairs."""

    train_prompts: list[str]
    train_answers: list[str]
    test_prompts: list[str]
    test_answers: list[str]


def wordnet_prompt(word: str) -> str:
    """The instruction for one WordNet noun."""
    return f'Define the word "{word}".'


def load_wordnet_instructions(cfg: DataConfig, *, seed: int) -> InstructionData:
    """WordNet instruction pairs, ``examples-per-label`` per category (seeded)."""
    names = fdata.wordnet_categories(cfg, at_least=1)
    drawn = fdata.sample_by_category(cfg, names, seed=seed)
    return InstructionData(
        [wordnet_prompt(s.lemma) for _, s in drawn],
        [s.definition for _, s in drawn],
        [group for group, _ in drawn],
    )


def load_instruction_table(cfg: DataConfig) -> InstructionData:
    """The user's own pairs (``prompt-column`` / ``answer-column``) or plain text.

    Raises
    ------
    ConfigError
        Naming the missing column key and its value, and the columns the file has.
    """
    path = Path(cfg.data_path).expanduser()
    if not path.exists():
        raise ConfigError(f"`data-path` {cfg.data_path!r} does not exist.")
    table = fdata.read_table(path)
    columns = list(table.column_names)
    has_prompt, has_answer = cfg.prompt_column in columns, cfg.answer_column in columns
    if not has_prompt and not has_answer and cfg.text_column in columns:
        texts = [table_cell(v) for v in table[cfg.text_column]]
        return InstructionData([""] * len(texts), texts, [0] * len(texts), plain_text=True)
    for key, column, present in (
        ("prompt-column", cfg.prompt_column, has_prompt),
        ("answer-column", cfg.answer_column, has_answer),
    ):
        if not present:
            raise ConfigError(
                f"`{key}` is {column!r}, but {str(path)!r} has no such column; its columns "
                f"are: {', '.join(columns)}. Instruction data needs `prompt-column` and "
                f"`answer-column` (or only `text-column` for plain text)."
            )
    prompts = [table_cell(v) for v in table[cfg.prompt_column]]
    answers = [table_cell(v) for v in table[cfg.answer_column]]
    return InstructionData(prompts, answers, [0] * len(answers))


def table_cell(value: object) -> str:
    """One cell of a text column as a string; an empty cell (``None``) is ``""``.

    An empty cell is a record like any other, not an error: an error (or a dropped
    record) would make what the node sends depend on one record's contents, and the
    server reads a node's error texts and counts (issue 26).
    """
    return "" if value is None else str(value)


@process_memo(data_key, maxsize=4)
def load_instructions(cfg: DataConfig, *, seed: int) -> InstructionData:
    """The configured instruction data, capped at ``max-examples`` (seeded).

    Loaded once per process and configuration (:mod:`fedtune.data.memo`; read-only).
    """
    if cfg.data_path:
        data = load_instruction_table(cfg)
    else:
        data = load_wordnet_instructions(cfg, seed=seed)
    if cfg.data_path and cfg.partitioning == "dirichlet":
        raise ConfigError(
            f"`partitioning` is {cfg.partitioning!r}, but instruction data from `data-path` "
            "has no labels to skew by; use 'iid'."
        )
    if cfg.max_examples and len(data) > cfg.max_examples:
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(data), cfg.max_examples, replace=False))
        data = InstructionData(
            [data.prompts[i] for i in keep],
            [data.answers[i] for i in keep],
            [data.groups[i] for i in keep],
            data.plain_text,
        )
    return data


def instruction_split(
    data: InstructionData, cfg: DataConfig, *, partition_id: int, num_partitions: int, seed: int
) -> InstructionSplit:
    """One client's partition and held-out split, by the rule every task shares.

    The topic groups drive a ``dirichlet`` partition as labels do for classification.
    """
    split = fdata.client_split(
        data.groups,
        cfg,
        partition_id=partition_id,
        num_partitions=num_partitions,
        seed=seed,
        contents=[f"{p}\t{a}" for p, a in zip(data.prompts, data.answers, strict=True)],
    )
    return InstructionSplit(
        train_prompts=[data.prompts[i] for i in split.train],
        train_answers=[data.answers[i] for i in split.train],
        test_prompts=[data.prompts[i] for i in split.test],
        test_answers=[data.answers[i] for i in split.test],
    )


def chat_messages(prompt: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat turns of one example (the template adds any default system text)."""
    turns = [{"role": "user", "content": prompt}]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """What the model is shown before it answers (also used for generation)."""
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                chat_messages(prompt), tokenize=False, add_generation_prompt=True
            )
        )
    bos = tokenizer.bos_token or ""
    return f"{bos}{prompt} " if prompt else bos


def encode_example(
    tokenizer: Any,
    prompt: str,
    answer: str,
    *,
    max_length: int,
    stop_ids: frozenset[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example; labels are ``-100`` outside the answer.

    An example longer than ``max_length`` is truncated, never dropped (see
    :func:`fit_example`), so every record stays one example whatever its length and
    the count a node sends does not depend on its records' contents. ``stop_ids``
    (default: :func:`end_of_turn_ids`) end the answer.
    """
    head = prompt_text(tokenizer, prompt)
    eos_ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        full = str(tokenizer.apply_chat_template(chat_messages(prompt, answer), tokenize=False))
        if not full.startswith(head):
            raise ConfigError(
                "The tokenizer's chat template renders prompt and answer so that the "
                "prompt is not a prefix; fedtune cannot mask the answer exactly. Use a "
                "model whose template appends the assistant turn."
            )
        tail = full[len(head) :]
    else:
        tail = answer
        if tokenizer.eos_token_id is not None:
            eos_ids = [int(tokenizer.eos_token_id)]
    head_ids = [int(i) for i in tokenizer(head, add_special_tokens=False)["input_ids"]]
    tail_ids = [int(i) for i in tokenizer(tail, add_special_tokens=False)["input_ids"]] + eos_ids
    # Anything the template puts after the end-of-turn token (a newline) is not answer.
    stop = _end_of_answer(tail_ids, end_of_turn_ids(tokenizer) if stop_ids is None else stop_ids)
    tail_labels = tail_ids[:stop] + [IGNORE] * (len(tail_ids) - stop)
    kept_head, kept_tail = fit_example(len(head_ids), len(tail_ids), max_length=max_length)
    ids = _keep(head_ids, kept_head) + tail_ids[:kept_tail]
    labels = [IGNORE] * kept_head + tail_labels[:kept_tail]
    return ids, labels


def fit_example(head: int, tail: int, *, max_length: int) -> tuple[int, int]:
    """How many prompt (``head``) and answer (``tail``) tokens an example keeps.

    An example that fits is kept whole. Otherwise the answer keeps its first
    ``max(max_length - head, max_length // 2)`` tokens (all of them if fewer) and the
    prompt the rest of ``max_length``: its first and its last tokens (the template's
    start and the generation prompt), the middle cut (:func:`_keep`). So an answer
    that has any token keeps at least one labelled token (``max_length >= 2``) and no
    record is ever dropped: under the replace-one relation a node's example count is
    the number of its records, whatever one record holds (issue 26).

    Returns
    -------
    tuple[int, int]
        ``(prompt tokens kept, answer tokens kept)``, summing to at most ``max_length``.
    """
    if head < 0 or tail < 0 or max_length < 2:
        raise ValueError(
            f"fit_example needs head, tail >= 0 and max_length >= 2, got head={head}, "
            f"tail={tail}, max_length={max_length}."
        )
    if head + tail <= max_length:
        return head, tail
    answer = min(tail, max(max_length - head, max_length // 2))
    return min(head, max_length - answer), answer


def _keep(ids: list[int], count: int) -> list[int]:
    """``count`` of ``ids``: all of them, or the first ``count - count // 2`` and the
    last ``count // 2`` (the middle of a prompt goes first)."""
    if count >= len(ids):
        return list(ids)
    back = count // 2
    return ids[: count - back] + (ids[len(ids) - back :] if back else [])


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that end an answer: ``eos`` and the usual end-of-turn tokens the vocabulary has."""
    vocab = tokenizer.get_vocab()
    stops = {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>") if t in vocab}
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    return frozenset(stops)


def _end_of_answer(tail_ids: Sequence[int], stops: frozenset[int]) -> int:
    """Index just past the last end-of-turn / eos token in ``tail_ids`` (else its length)."""
    for i in range(len(tail_ids) - 1, -1, -1):
        if tail_ids[i] in stops:
            return i + 1
    return len(tail_ids)


class InstructionDataset(Dataset[dict[str, torch.Tensor]]):
    """Tokenised examples with answer-only labels; items are unpadded 1-D tensors.

    One item per (prompt, answer) record, always: a record longer than
    ``max_length`` is truncated (:func:`fit_example`), an empty one is kept (its
    answer is the end-of-turn token alone), so ``len`` is the number of records.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[str],
        answers: Sequence[str],
        *,
        max_length: int,
    ) -> None:
        self.input_ids: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.prompts: list[str] = list(prompts)
        self.answers: list[str] = list(answers)
        stops = end_of_turn_ids(tokenizer)
        for prompt, answer in zip(self.prompts, self.answers, strict=True):
            ids, labels = encode_example(
                tokenizer, prompt, answer, max_length=max_length, stop_ids=stops
            )
            self.input_ids.append(ids)
            self.labels.append(labels)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def lengths(self) -> list[int]:
        """Each item's token count (for length-sorted batches)."""
        return [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor(self.input_ids[i], dtype=torch.long),
            "labels": torch.tensor(self.labels[i], dtype=torch.long),
        }

    def collate_fn(self):  # type: ignore[no-untyped-def]
        """Right-pad a batch to its longest row (labels padded with ``-100``)."""
        return pad_collate(self.pad_id)
