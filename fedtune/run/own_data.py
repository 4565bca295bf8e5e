"""Use a finished classification run on new data: score a labelled file, label new texts.

``fedtune evaluate RUN_DIR --data FILE`` and ``fedtune predict RUN_DIR`` load the base
model plus ``RUN_DIR/adapter`` with stock PEFT (:func:`fedtune.run.export.load_adapter`),
as ``fedtune evaluate`` does. A file is read as the run's own data is
(:func:`fedtune.data.sources.read_table`: CSV, JSONL or a saved dataset; bytes that
are not UTF-8 become U+FFFD), with the run's ``text-column`` and ``label-column``;
its labels must be among the adapter's (``adapter/fedtune.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig, load_toml
from fedtune.data.sources import read_table
from fedtune.errors import ConfigError
from fedtune.model import load_tokenizer
from fedtune.resolve import resolve
from fedtune.run.export import load_adapter
from fedtune.tasks import get_task
from fedtune.tasks.classification import EncodedDataset
from fedtune.train import make_loader, select_device

__all__ = ["Prediction", "load_run", "predict_texts", "read_file", "score_file"]


@dataclass(frozen=True)
class Prediction:
    """One text's most likely label and the model's probability for it."""

    text: str
    label: str
    probability: float


def load_run(run_dir: Path, *, command: str) -> tuple[RunConfig, list[str]]:
    """The run's config and its adapter's label names; classification runs only."""
    run_dir = Path(run_dir)
    for needed in ("config.toml", "adapter/fedtune.json"):
        if not (run_dir / needed).is_file():
            raise ConfigError(
                f"{str(run_dir)!r} has no {needed}; expected a finished `fedtune simulate` "
                "run (or one `fedtune export` wrote the adapter of)."
            )
    cfg = resolve(load_toml(run_dir / "config.toml"), wiring=False).config
    if not get_task(cfg.model.task).uses_labels:  # nothing to label: a generative task
        other = "`fedtune generate`" if command == "predict" else "`fedtune evaluate RUN_DIR`"
        raise ConfigError(
            f"`fedtune {command}` labels text for task = 'classification'; {str(run_dir)!r} "
            f"is a {cfg.model.task!r} run: use {other}."
        )
    meta = json.loads((run_dir / "adapter" / "fedtune.json").read_text())
    labels = [str(n) for n in meta.get("label-names", [])]
    return cfg, labels


def read_file(
    path: Path, *, text_column: str, label_column: str | None
) -> tuple[list[str], list[str] | None]:
    """Texts (and labels, when ``label_column`` is given) of a CSV / JSONL / dataset file."""

    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"--data {str(path)!r} does not exist.")
    if path.is_file():
        _check_not_empty(path)
    try:
        table = read_table(path)
    except ConfigError as err:
        raise ConfigError(str(err).replace("`data-path`", "--data")) from err
    except Exception as err:  # pandas / arrow parse errors: one line, not a traceback
        raise ConfigError(
            f"--data {str(path)!r} cannot be read as a table: {type(err).__name__}: {err}"
        ) from err
    needed = [("text-column", text_column)]
    if label_column is not None:
        needed.append(("label-column", label_column))
    for key, column in needed:
        if column not in table.column_names:
            raise ConfigError(
                f"--data {str(path)!r} has no column {column!r} (the run's `{key}`); its "
                f"columns are: {', '.join(table.column_names) or 'none'}."
            )
    if len(table) == 0:
        raise ConfigError(f"--data {str(path)!r} has a header but no rows.")
    texts = ["" if t is None else str(t) for t in table[text_column]]
    if label_column is None:
        return texts, None
    raw = list(table[label_column])
    empty = [i + 2 for i, v in enumerate(raw) if v is None or str(v) == ""]
    if empty:
        raise ConfigError(
            f"--data {str(path)!r}: column {label_column!r} is empty on line(s) {empty[:5]}."
        )
    return texts, [str(v) for v in raw]


def _check_not_empty(path: Path) -> None:
    """One line for an empty file or a CSV of a header only (datasets' own errors are cryptic)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(1 << 16)
    except OSError as err:
        raise ConfigError(f"--data {str(path)!r} cannot be read: {err.strerror or err}") from err
    lines = [line for line in head.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"--data {str(path)!r} is empty; expected a header line and rows.")
    if path.suffix.lower() == ".csv" and len(lines) == 1 and len(head) < (1 << 16):
        raise ConfigError(f"--data {str(path)!r} has a header but no rows.")


def _model(run_dir: Path, cfg: RunConfig) -> tuple[Any, Any, Any]:

    model = load_adapter(Path(run_dir) / "adapter", cfg)
    return model, load_tokenizer(cfg.model), select_device(cfg.train.device)


def score_file(run_dir: Path, data: Path) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of the run's adapter on a labelled file."""

    cfg, labels = load_run(run_dir, command="evaluate")
    texts, found = read_file(
        data, text_column=cfg.data.text_column, label_column=cfg.data.label_column
    )
    assert found is not None  # a label column was asked for
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise ConfigError(
            f"--data {str(data)!r}: column {cfg.data.label_column!r} has labels "
            f"{unknown[:5]} the adapter was not trained on; it knows: {', '.join(labels)}."
        )
    index = {name: i for i, name in enumerate(labels)}
    model, tokenizer, device = _model(run_dir, cfg)
    dataset = EncodedDataset(
        tokenizer, texts, [index[v] for v in found], max_length=cfg.data.max_seq_length
    )
    loader = make_loader(dataset, batch_size=64, shuffle=False, by_length=True)
    result = get_task(cfg.model.task).evaluate(model, loader, device=device, cfg=cfg)
    counts = {name: found.count(name) for name in labels if name in found}
    return {
        "data": str(data),
        "eval-accuracy": result.accuracy,
        "eval-loss": result.loss,
        "eval-examples": result.num_examples,
        "labels": counts,
    }


def predict_texts(run_dir: Path, texts: Sequence[str], *, batch_size: int = 64) -> list[Prediction]:
    """The most likely label of each text and its softmax probability."""
    import torch

    cfg, labels = load_run(run_dir, command="predict")
    model, tokenizer, device = _model(run_dir, cfg)
    model.to(device).eval()
    out: list[Prediction] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = tokenizer(
                chunk,
                truncation=True,
                max_length=cfg.data.max_seq_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            probs = model(**enc).logits.double().softmax(-1)
            best = probs.argmax(-1)
            for text, i, row in zip(chunk, best.tolist(), probs, strict=True):
                p = float(row[i])
                out.append(Prediction(text, labels[i], p if math.isfinite(p) else math.nan))
    return out
