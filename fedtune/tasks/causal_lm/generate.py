"""Answers from a finished causal-LM run: greedy generation, sample answers, re-scoring.

Everything here loads the base model and ``RUN_DIR/adapter`` with stock
``peft.PeftModel.from_pretrained``, the way a user would, so it also checks that
the exported adapter is the model the federation reported on.

At the end of a causal-LM simulation the key holder writes ``RUN_DIR/samples.jsonl``:
for a few fixed prompts (the first :data:`NUM_SAMPLES` held-out prompts of
client 0, so they are never trained on) the reference answer, the base model's
answer and the final adapter's answer, all greedy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig, load_toml
from fedtune.errors import ConfigError
from fedtune.model import load_tokenizer
from fedtune.resolve import resolve
from fedtune.run.export import load_adapter
from fedtune.run.metrics import read_records, weighted_mean
from fedtune.run.rescore import held_out_results
from fedtune.tasks import get_task, task_names
from fedtune.tasks.causal_lm import data as lm_data
from fedtune.tasks.causal_lm.data import prompt_text
from fedtune.tasks.causal_lm.loss import perplexity
from fedtune.train import select_device

if TYPE_CHECKING:
    import torch
    from torch import nn

#: How many fixed held-out prompts a finished run answers in ``samples.jsonl``.
NUM_SAMPLES = 4


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved configuration of a finished causal-LM run."""
    run_dir = Path(run_dir)
    for needed in ("config.toml", "adapter"):
        if not (run_dir / needed).exists():
            raise ConfigError(
                f"{str(run_dir)!r} has no {needed}; is it a finished `fedtune simulate` run?"
            )
    cfg = resolve(load_toml(run_dir / "config.toml"), wiring=False).config
    if not get_task(cfg.model.task).generative:
        generative = [n for n in task_names() if get_task(n).generative]
        raise ConfigError(
            f"{str(run_dir)!r} has `task` = {cfg.model.task!r}; `fedtune generate` needs a "
            f"run of a generative task ({', '.join(repr(n) for n in generative)})."
        )
    return cfg


def load_lm(run_dir: Path) -> tuple[RunConfig, nn.Module, Any]:
    """``(cfg, model, tokenizer)``: the base causal LM with ``RUN_DIR/adapter`` (stock PEFT)."""
    cfg = load_run_config(run_dir)
    model = load_adapter(Path(run_dir) / "adapter", cfg)
    return cfg, model, load_tokenizer(cfg.model)


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    device: torch.device | None = None,
) -> list[str]:
    """Greedy answers to ``prompts``, formatted with the model's chat template."""
    import torch  # heavy import, not at CLI start

    device = device or torch.device("cpu")
    model.to(device).eval()
    answers = []
    for prompt in prompts:
        text = prompt_text(tokenizer, prompt)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
            )
        new = out[0, enc["input_ids"].shape[1] :]
        answers.append(str(tokenizer.decode(new, skip_special_tokens=True)).strip())
    return answers


def fixed_prompts(cfg: RunConfig) -> list[tuple[str, str]]:
    """``(prompt, reference answer)`` for the first held-out examples of client 0."""
    fed = cfg.federation
    data = lm_data.load_instructions(cfg.data, seed=fed.seed)
    split = lm_data.instruction_split(
        data, cfg.data, partition_id=0, num_partitions=fed.num_clients, seed=fed.seed
    )
    pairs = list(zip(split.test_prompts, split.test_answers, strict=True))
    return pairs[:NUM_SAMPLES]


def write_samples(run_dir: Path, rows: list[dict[str, str]] | None = None) -> Path:
    """Answer fixed held-out prompts with the base model and the final adapter; write JSONL.

    ``rows``: each with ``prompt`` and ``reference`` (and any other fields to keep
    beside them); default :func:`fixed_prompts` of the run.
    """
    cfg, model, tokenizer = load_lm(run_dir)
    device = select_device(cfg.train.device)
    if rows is None:
        rows = [{"prompt": p, "reference": r} for p, r in fixed_prompts(cfg)]
    prompts = [row["prompt"] for row in rows]
    tuned = generate_answers(
        model, tokenizer, prompts, max_new_tokens=cfg.model.max_new_tokens, device=device
    )
    with model.disable_adapter():  # type: ignore[operator]
        base = generate_answers(
            model, tokenizer, prompts, max_new_tokens=cfg.model.max_new_tokens, device=device
        )
    path = Path(run_dir) / "samples.jsonl"
    with path.open("w") as fh:
        for row, b, t in zip(rows, base, tuned, strict=True):
            fh.write(json.dumps({**row, "base": b, "adapter": t}) + "\n")
    return path


def rescore_run(run_dir: Path) -> dict[str, Any]:
    """Per-client and weighted held-out answer loss / perplexity of ``RUN_DIR/adapter``."""
    cfg, model, tokenizer = load_lm(run_dir)
    results = held_out_results(get_task(cfg.model.task), cfg, model, tokenizer)
    clients = {
        name: {
            "eval-loss": r.loss,
            "eval-perplexity": perplexity(r.loss),
            "eval-accuracy": r.accuracy,
            "eval-examples": r.num_examples,
        }
        for name, r in results.items()
    }
    pairs = [(c["eval-loss"], int(c["eval-examples"])) for c in clients.values()]
    loss = weighted_mean(pairs)
    last = read_records(Path(run_dir) / "metrics.jsonl")[-1]
    return {
        "round": last["round"],
        "clients": clients,
        "eval-loss": loss,
        "eval-perplexity": perplexity(loss),
        "eval-accuracy": weighted_mean(
            [(c["eval-accuracy"], int(c["eval-examples"])) for c in clients.values()]
        ),
        "reported-perplexity": last.get("eval-perplexity", math.nan),
        "reported-accuracy": last.get("eval-accuracy", math.nan),
    }
