"""Answer-only loss and held-out metrics (token loss, accuracy, perplexity) of a causal LM.

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
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual alias
from torch.utils.data import DataLoader

from fedtune.data.collate import IGNORE
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
    mask = shifted != IGNORE
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        shifted.reshape(-1),
        ignore_index=IGNORE,
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


@torch.no_grad()
def example_metrics_lm(
    model: nn.Module, loader: DataLoader[Any], *, device: torch.device
) -> dict[str, list[float]]:
    """Per example: mean answer-token NLL (``eval-loss``) and token accuracy (``eval-accuracy``).

    The DP evaluation (:mod:`fedtune.privacy.evaluation`) bounds and sums these: per
    example, not per token, because one example's share of a token-weighted mean is
    unbounded. An example without answer tokens counts as loss 0, accuracy 0.
    """
    model.to(device).eval()
    losses: list[float] = []
    accuracies: list[float] = []
    for raw in loader:
        batch = {k: v.to(device) for k, v in raw.items()}
        logits = _logits(model, batch)
        nll, mask = token_nll(logits, batch["labels"])
        hits = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & mask
        tokens = mask.sum(1).clamp(min=1).double()
        losses += (nll.double().sum(1) / tokens).tolist()
        accuracies += (hits.double().sum(1) / tokens).tolist()
    return {"eval-loss": losses, "eval-accuracy": accuracies}


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` on overflow, NaN for NaN."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
