"""Replace-one neighbours send the same counts: every non-DP field of a DP node's reply.

fedtune accounts every release under the replace-one relation (``fedtune/messages.py``:
``num-examples`` is public because neighbouring data sets have the same size). That
holds only if nothing turns one record into zero: a record longer than the server's
``max-seq-length``, an empty cell, or text the tokenizer does not know. Each test
drives the real round code (:func:`fedtune.node.round.handle`, as a deployed node on its
own data file) on a data set and on its neighbour with one record replaced by an
adversarial one, and compares every field of the two replies: the non-DP fields
exactly, the DP field (the noised update) by its type and length only.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import node_pins, toy_instruction_rows, toy_preference_rows, toy_rows
from flwr.app import ConfigRecord, RecordDict

from fedtune.messages import TRAIN_FIELDS
from fedtune.node.round import handle

LONG = " ".join(["what is a dog ?"] * 60)  # far beyond max-seq-length = 48 tokens
#: Text no tokenizer vocabulary here holds: controls, a lone surrogate's replacement,
#: right-to-left marks, a NUL.
ODD = "\x00\ufffd\u202e\U0001f600 \x7f\x1b[2J"


def _train_content() -> RecordDict:
    config = {"server-round": 1, "sampled-clients": 1, "evaluate-round": 0}
    return RecordDict({"config": ConfigRecord(config)})  # type: ignore[arg-type,dict-item]


def _reply(run_config: dict[str, object], data: Path, state: Path) -> RecordDict:
    state.mkdir()
    return handle(
        "train",
        _train_content(),
        run_config=run_config,
        node_config={
            "state-dir": str(state),
            "data-path": str(data),
            "name": "node-a",
            **node_pins(Path(str(run_config["model-path"])), run_config["max-seq-length"]),
        },
        run_id=11,
        deployed=True,
    )


def _assert_same_but_the_noise(one: RecordDict, other: RecordDict) -> None:
    """Every field equal, except DP-protected ones: same type and length there."""
    assert set(one.config_records) == set(other.config_records)
    assert set(one.metric_records) == set(other.metric_records)
    records = {**one.config_records, **one.metric_records}
    others = {**other.config_records, **other.metric_records}
    dp_fields = 0
    for name, record in records.items():
        theirs = others[name]
        assert set(record) == set(theirs), name
        for key, value in record.items():
            if TRAIN_FIELDS.get((name, key)) == "dp":
                dp_fields += 1
                assert type(value) is type(theirs[key])
                assert len(value) == len(theirs[key])  # type: ignore[arg-type]
                assert [len(c) for c in value] == [len(c) for c in theirs[key]]  # type: ignore[union-attr]
            elif name == "evaluation" and key != "num-examples":
                # a held-out metric: a DP release (noised) by default, so type only
                assert type(value) is type(theirs[key]), (name, key)
            else:
                assert value == theirs[key], (name, key, value, theirs[key])
    assert dp_fields == 1  # the update was sent, and compared by shape only


def _run(
    tmp_path: Path,
    run_config: dict[str, object],
    write: Callable[[Path, list[dict[str, str]]], None],
    rows: list[dict[str, str]],
    replaced: dict[str, str],
) -> tuple[RecordDict, RecordDict]:
    original, neighbour = tmp_path / "a", tmp_path / "b"
    original.mkdir()
    neighbour.mkdir()
    write(original / "data.jsonl", rows)
    write(neighbour / "data.jsonl", [replaced, *rows[1:]])
    return (
        _reply(run_config, original / "data.jsonl", original / "state"),
        _reply(run_config, neighbour / "data.jsonl", neighbour / "state"),
    )


def _jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _dp(extra: dict[str, object]) -> dict[str, object]:
    return {
        "max-seq-length": 48,
        "batch-size": 8,
        "learning-rate": 0.05,
        "optimizer": "sgd",
        "seed": 3,
        "num-clients": 1,
        "min-clients": 1,
        "dp": "example",
        "noise-multiplier": 2.0,
        "max-grad-norm": 1.0,
        "epsilon-budget": 1000.0,
        **extra,
    }


@pytest.mark.parametrize(
    "replaced",
    [
        {"text": LONG, "label": "animal"},
        {"text": "", "label": "food"},
        {"text": ODD, "label": "tool"},
    ],
    ids=["long", "empty", "odd"],
)
def test_classification_neighbours_send_the_same_counts(
    tiny_model_dir: Path, tmp_path: Path, replaced: dict[str, str]
) -> None:
    run_config = _dp({"model-path": str(tiny_model_dir), "label-names": "animal,food,tool"})
    one, other = _run(tmp_path, run_config, _jsonl, toy_rows(6), replaced)
    _assert_same_but_the_noise(one, other)
    assert one.metric_records["metrics"]["num-examples"] + (
        one.metric_records["evaluation"]["num-examples"]
    ) == len(toy_rows(6))


def _lm_config(model: Path, task: str) -> dict[str, object]:
    return _dp({"task": task, "model-path": str(model), "lora-target-modules": "q_proj,v_proj"})


@pytest.mark.parametrize(
    "replaced",
    [
        {"prompt": LONG, "answer": "a dog is a kind of animal ."},  # no answer token fitted
        {"prompt": "what is a dog ?", "answer": LONG},
        {"prompt": "what is a dog ?", "answer": ""},
        {"prompt": "", "answer": ODD},
    ],
    ids=["long-prompt", "long-answer", "empty-answer", "odd"],
)
def test_causal_lm_neighbours_send_the_same_counts(
    tiny_llama_dir: Path, tmp_path: Path, replaced: dict[str, str]
) -> None:
    rows = toy_instruction_rows(4)
    one, other = _run(tmp_path, _lm_config(tiny_llama_dir, "causal-lm"), _jsonl, rows, replaced)
    _assert_same_but_the_noise(one, other)
    sent = one.metric_records["metrics"]["num-examples"]
    assert sent + one.metric_records["evaluation"]["num-examples"] == len(rows)


@pytest.mark.parametrize(
    "replaced",
    [
        {"prompt": LONG, "chosen": "a dog is a kind of animal .", "rejected": "a dog ."},
        {"prompt": "what is a dog ?", "chosen": LONG, "rejected": "a dog is a kind of food ."},
        {"prompt": "what is a dog ?", "chosen": "a dog .", "rejected": ""},
        {"prompt": ODD, "chosen": ODD, "rejected": ODD},
    ],
    ids=["long-prompt", "long-chosen", "empty-rejected", "odd"],
)
def test_preference_neighbours_send_the_same_counts(
    tiny_llama_dir: Path, tmp_path: Path, replaced: dict[str, str]
) -> None:
    rows = toy_preference_rows(4)
    one, other = _run(tmp_path, _lm_config(tiny_llama_dir, "preference"), _jsonl, rows, replaced)
    _assert_same_but_the_noise(one, other)
    sent = one.metric_records["metrics"]["num-examples"]
    assert sent + one.metric_records["evaluation"]["num-examples"] == len(rows)


def _csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_csv_record_of_bytes_that_are_not_utf8_counts_as_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run_config = _dp({"model-path": str(tiny_model_dir), "label-names": "animal,food,tool"})
    rows = toy_rows(6)
    original, neighbour = tmp_path / "a", tmp_path / "b"
    original.mkdir()
    neighbour.mkdir()
    _csv(original / "data.csv", rows)
    _csv(neighbour / "data.csv", rows)
    raw = (neighbour / "data.csv").read_bytes().split(b"\n")
    raw[1] = b'"a \xff\xfe dog \xc3(",animal\r'  # invalid UTF-8 in the first record's text
    (neighbour / "data.csv").write_bytes(b"\n".join(raw))
    one = _reply(run_config, original / "data.csv", original / "state")
    other = _reply(run_config, neighbour / "data.csv", neighbour / "state")
    _assert_same_but_the_noise(one, other)
