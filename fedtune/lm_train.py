"""Answer-only loss, held-out perplexity and the causal-LM pieces of a client and a run.

The training loss is a mean over examples of each example's mean token
cross-entropy on its answer tokens::

    L = 1/B * sum_i ( 1/|A_i| * sum_{t in A_i} -log p(x_t | x_<t) )

Each row's loss depends on that row only, which is what DP-SGD needs: Opacus'
per-sample gradient of row ``i`` (``loss_reduction = "mean"`` scales by ``B``) is
the gradient of example ``i``'s own mean answer loss. Hugging Face's built-in
loss (a mean over every answer token in the batch) would weight an example by
its share of the batch's tokens, so one example's gradient would depend on the
lengths of the others, and the per-example sensitivity would no longer be ``C``.

Held-out metrics are per token: ``eval-loss`` is the mean negative
log-likelihood over all answer tokens of a client's held-out split,
``eval-perplexity = exp(eval-loss)``, and ``eval-accuracy`` is the share of
answer tokens the model predicts exactly (greedy next token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual alias
from torch.utils.data import DataLoader

from fedtune import lm_data
from fedtune.config import ConfigError, RunConfig
from fedtune.train import EvalResult


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits if hasattr(out, "logits") else out[0]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the next token, and the answer mask.

    Position ``t`` predicts token ``t + 1``; returns ``(nll, mask)`` of shape
    ``(B, T - 1)`` with ``nll = 0`` where the label is ``-100``.
    """
    shifted = labels[:, 1:]
    mask = shifted != lm_data.IGNORE
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        shifted.reshape(-1),
        ignore_index=lm_data.IGNORE,
        reduction="none",
    ).view(shifted.shape)
    return nll, mask


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over rows of each row's mean answer-token NLL (see the module docstring)."""
    nll, mask = token_nll(_logits(model, batch), batch["labels"])
    per_row = nll.sum(1) / mask.sum(1).clamp(min=1)
    return per_row.mean()


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader: DataLoader[Any], *, device: torch.device) -> EvalResult:
    """Answer-token loss, token accuracy and perplexity over ``loader``."""
    model.to(device).eval()
    total, correct, tokens, seen = 0.0, 0, 0, 0
    for raw in loader:
        batch = {k: v.to(device) for k, v in raw.items()}
        logits = _logits(model, batch)
        nll, mask = token_nll(logits, batch["labels"])
        predicted = logits[:, :-1].argmax(-1)
        total += float(nll.sum())
        correct += int(((predicted == batch["labels"][:, 1:]) & mask).sum())
        tokens += int(mask.sum())
        seen += len(batch["labels"])
    if not tokens:
        return EvalResult(loss=math.nan, accuracy=math.nan, num_examples=0)
    loss = total / tokens
    return EvalResult(loss=loss, accuracy=correct / tokens, num_examples=seen)


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` on overflow, NaN for NaN."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class LMClientData:
    """A client's tokenised train and held-out instruction data."""

    train_set: lm_data.InstructionDataset
    test_set: lm_data.InstructionDataset


def client_datasets(
    cfg: RunConfig, tokenizer: Any, *, partition_id: int, num_partitions: int
) -> LMClientData:
    """Load, partition, split and tokenise one client's instruction data."""
    seed = cfg.federation.seed
    data = lm_data.load_instructions(cfg.data, seed=seed)
    split = lm_data.instruction_split(
        data, cfg.data, partition_id=partition_id, num_partitions=num_partitions, seed=seed
    )
    max_len = cfg.data.max_seq_length
    train = lm_data.InstructionDataset(
        tokenizer, split.train_prompts, split.train_answers, max_length=max_len
    )
    test = lm_data.InstructionDataset(
        tokenizer, split.test_prompts, split.test_answers, max_length=max_len
    )
    if len(train) == 0:
        raise ConfigError(
            f"`max-seq-length` is {max_len}, too short for any training example of client "
            f"{partition_id} to keep an answer token after its prompt; raise it."
        )
    return LMClientData(train, test)


def preflight_lm(cfg: RunConfig) -> RunConfig:
    """Check model, tokenizer, data and partitions of a causal-LM run before it starts."""
    from fedtune import data as fdata  # noqa: PLC0415
    from fedtune.model import build_model, load_tokenizer, resolve_model_path  # noqa: PLC0415

    fed = cfg.federation
    resolve_model_path(cfg.model)
    data = lm_data.load_instructions(cfg.data, seed=fed.seed)
    fdata.partition_indices(data.groups, cfg.data, num_partitions=fed.num_clients, seed=fed.seed)
    tokenizer = load_tokenizer(cfg.model)
    probe = lm_data.InstructionDataset(
        tokenizer, data.prompts[:64], data.answers[:64], max_length=cfg.data.max_seq_length
    )
    if len(probe) == 0:
        raise ConfigError(
            f"`max-seq-length` is {cfg.data.max_seq_length}: no example keeps an answer "
            "token after its (templated) prompt; raise it."
        )
    build_model(cfg.model, num_labels=0, seed=fed.seed)  # checks lora-target-modules
    return cfg
