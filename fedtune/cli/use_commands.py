"""``fedtune evaluate``, ``export`` and ``predict``: use a finished run's adapter.

``evaluate`` and ``export`` keep the parsers :mod:`fedtune.cli.run_commands` registers;
:func:`extend_parsers` adds their options for using the adapter elsewhere
(``evaluate --data FILE``, ``export --base-model NAME``), and :func:`add_parser`
registers ``predict``, the classification counterpart of ``fedtune generate``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fedtune.cli.run_commands import output_dir
from fedtune.config import load_toml
from fedtune.errors import ConfigError
from fedtune.resolve import resolve
from fedtune.run.card import loading_snippet
from fedtune.run.metrics import read_records

__all__ = ["add_parser", "extend_parsers", "run_evaluate", "run_export", "run_predict"]


def extend_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``--data`` to ``evaluate`` and ``--base-model`` to ``export``."""
    ev = sub.choices["evaluate"]
    ev.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help=(
            "score this labelled file (CSV, JSONL or a saved dataset with the run's "
            "text-column and label-column) instead of the clients' held-out splits"
        ),
    )
    ex = sub.choices["export"]
    ex.add_argument(
        "--base-model",
        metavar="NAME",
        help=(
            "the base_model_name_or_path to write into adapter_config.json and the model "
            "card: a Hugging Face Hub id or a path on the machine that will load it "
            "(default: the bundled model's hub id, else the run's model-path)"
        ),
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedtune predict``."""
    pr = sub.add_parser(
        "predict",
        help="label new text with a classification run's base model + final adapter",
        description=(
            "Load the base model and RUN_DIR/adapter with peft.PeftModel.from_pretrained and "
            "print the most likely label of each --text, or of each row of --data FILE "
            "(its text-column), with the model's probability for it."
        ),
    )
    pr.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="a directory written by `fedtune simulate` with task = 'classification'",
    )
    what = pr.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--text", action="append", help="a text to label (repeatable: one label per text)"
    )
    what.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="a CSV / JSONL file or saved dataset: label every row of its text-column",
    )
    pr.add_argument(
        "--text-column",
        metavar="NAME",
        help="the column of --data that holds the text (default: the run's text-column)",
    )
    pr.add_argument("--json", action="store_true", help="print texts, labels and probabilities")


def _reported(run_dir: Path, round_: int | None) -> dict[str, Any] | None:
    """The ``metrics.jsonl`` record of ``round_`` (None: no such round was reported)."""
    try:
        records = read_records(run_dir / "metrics.jsonl")
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {str(run_dir / 'metrics.jsonl')!r}: {err}") from err
    if round_ is None:
        return records[-1] if records else None
    return next((r for r in records if r.get("round") == round_), None)


def _adapter_round(run_dir: Path) -> int | None:
    try:
        meta = json.loads((run_dir / "adapter" / "fedtune.json").read_text())
    except (OSError, ValueError):
        return None
    value = meta.get("round") if isinstance(meta, dict) else None
    return value if isinstance(value, int) else None


def _num(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "-"


def run_evaluate(args: argparse.Namespace) -> int:
    """Re-score the adapter on the held-out splits (or ``--data``) and print it."""
    if getattr(args, "data", None) is not None:
        from fedtune.run.own_data import score_file  # torch, the task's model

        scored = score_file(args.run_dir, args.data)
        if args.json:
            print(json.dumps(scored, indent=1))
        else:
            print(
                f"{args.data}: accuracy {_num(scored['eval-accuracy'])}, loss "
                f"{_num(scored['eval-loss'])} on {scored['eval-examples']} examples"
            )
        return 0
    from fedtune.run.rescore import evaluate_run  # torch, the task's model

    report = evaluate_run(args.run_dir)
    adapter_round = _adapter_round(args.run_dir)
    if adapter_round is not None and adapter_round != report.get("round"):
        # An interrupted run exported after its last metrics line: compare like with like.
        record = _reported(args.run_dir, adapter_round) or {}
        report["round"] = adapter_round
        report["reported-accuracy"] = record.get("eval-accuracy")
        if "reported-perplexity" in report:
            report["reported-perplexity"] = record.get("eval-perplexity")
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for name, acc in report["clients"].items():
        print(f"{name}: accuracy {acc['eval-accuracy']:.4f} on {acc['eval-examples']} examples")
    reported = report.get("reported-accuracy")
    said = (
        f"the run reported {_num(reported)} for round {report['round']}"
        if isinstance(reported, float)
        else f"the run reported no accuracy for round {report['round']}, the adapter's round: "
        "it stopped before that round's evaluation"
    )
    print(f"weighted accuracy {report['eval-accuracy']:.4f} ({said})")
    if "eval-perplexity" in report:  # causal LM: accuracy is per answer token
        print(
            f"weighted answer perplexity {report['eval-perplexity']:.4f} "
            f"(the run reported {_num(report.get('reported-perplexity'))})"
        )
    if "eval-reward-margin" in report:  # preference: accuracy is preference accuracy
        print(f"weighted reward margin {report['eval-reward-margin']:.4f}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Decrypt (with ``args.key``) and write ``args.run_dir``'s final adapter and card."""
    from fedtune.run.export import export_adapter  # torch, the task's model

    if not args.run_dir.exists():
        raise ConfigError(
            f"{str(args.run_dir)!r} does not exist; expected a run directory "
            "with config.toml and checkpoint/."
        )
    if not args.run_dir.is_dir():
        raise ConfigError(
            f"{str(args.run_dir)!r} is not a run directory "
            "(expected config.toml and checkpoint/ in it)."
        )
    cfg = resolve(load_toml(args.run_dir / "config.toml"), wiring=False).config
    if args.key is not None and args.key.is_dir():
        raise ConfigError(
            f"--key {str(args.key)!r} is a directory; "
            "expected the secret.ctx file from `fedtune keygen`."
        )
    if args.key is not None and not args.key.is_file():
        raise ConfigError(f"--key {str(args.key)!r} does not exist.")
    base_model = getattr(args, "base_model", None)
    if base_model is not None and not base_model.strip():
        raise ConfigError("--base-model is empty; give a hub id such as 'org/model' or a path.")
    out_dir = args.out or args.run_dir / "adapter"
    output_dir(out_dir, "--out")
    try:
        out = export_adapter(
            args.run_dir, cfg, secret_context=args.key, out_dir=args.out, base_model=base_model
        )
    except OSError as err:  # a race with the checks above, a full disk, an unreadable key
        raise ConfigError(f"cannot export {str(args.run_dir)!r}: {err}") from err
    print(f"adapter written to {out} (model card: {out / 'README.md'}; load it with:)\n")
    print(_snippet(out, cfg))
    return 0


def _snippet(out: Path, cfg: Any) -> str:

    meta = json.loads((out / "fedtune.json").read_text())
    return loading_snippet(
        str(out), cfg, [str(n) for n in meta["label-names"]], base_model=meta.get("base-model")
    )


def run_predict(args: argparse.Namespace) -> int:
    """``fedtune predict``: one label per text."""
    from fedtune.run.own_data import load_run, predict_texts, read_file  # torch, the task's model

    if args.text is not None:
        texts = list(args.text)
    else:
        cfg, _ = load_run(args.run_dir, command="predict")
        texts, _ = read_file(
            args.data, text_column=args.text_column or cfg.data.text_column, label_column=None
        )
    predictions = predict_texts(args.run_dir, texts)
    if args.json:
        rows = [
            {"text": p.text, "label": p.label, "probability": round(p.probability, 6)}
            for p in predictions
        ]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        for p in predictions:
            print(f"{p.label}\t{p.probability:.3f}\t{p.text}")
    return 0
