"""``fedtune generate``: answer prompts with a finished generative run's adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError


def add_parser(sub: Any) -> None:
    """Register ``fedtune generate`` on the CLI's subparsers."""
    gen = sub.add_parser(
        "generate",
        help="answer a prompt with a causal-LM run's base model + final adapter",
        description=(
            "Load the base model and RUN_DIR/adapter with peft.PeftModel.from_pretrained, "
            "format each --prompt with the model's chat template and print the greedy answer."
        ),
    )
    gen.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="a directory written by `fedtune simulate` with task = 'causal-lm' or 'preference'",
    )
    gen.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="the instruction to answer (repeatable: one answer per prompt)",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit in tokens (default: the run's max-new-tokens)",
    )
    gen.add_argument("--json", action="store_true", help="print prompts and answers as JSON")


def run(args: argparse.Namespace) -> int:
    """``fedtune generate``: print one answer per prompt."""
    from fedtune.tasks.causal_lm.generate import generate_answers, load_lm  # torch
    from fedtune.train import select_device  # torch

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    cfg, model, tokenizer = load_lm(args.run_dir)
    answers = generate_answers(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens or cfg.model.max_new_tokens,
        device=select_device(cfg.train.device),
    )
    if args.json:
        rows = [{"prompt": p, "answer": a} for p, a in zip(args.prompt, answers, strict=True)]
        print(json.dumps(rows, indent=1))
    elif len(answers) == 1:
        print(answers[0])
    else:
        for prompt, answer in zip(args.prompt, answers, strict=True):
            print(f"> {prompt}\n{answer}\n")
    return 0
