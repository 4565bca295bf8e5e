"""The DPO loss of a preference pair, and its held-out metrics.

Direct Preference Optimization (Rafailov et al., "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model", NeurIPS 2023,
https://arxiv.org/abs/2305.18290). For a prompt ``x`` with a chosen answer ``y_w``
and a rejected one ``y_l``, with the policy ``π`` (base model + adapter) and the
reference ``π_ref`` (the same base model with the adapter disabled, PEFT's
``disable_adapter()``: no second model is loaded)::

    r(y) = β (log π(y | x) - log π_ref(y | x))          (implicit reward)
    L    = -log σ(r(y_w) - r(y_l))

``log π(y | x)`` is the sum of the answer tokens' log-probabilities (the prompt and
the padding carry label ``-100``). The batch loss is the mean of the pairs' losses:
each row's loss depends on that row only, so Opacus' per-sample gradient of row
``i`` (``loss_reduction = "mean"``) is pair ``i``'s own gradient. One pair is one
example: one row for Poisson sampling and for per-example clipping. The chosen and
the rejected answers go through the policy as two forward passes of the same ``B``
rows; Opacus adds the two passes' per-sample gradients row by row. The reference
log-probabilities are computed under ``torch.no_grad()``, where Opacus' hooks record
nothing, so they are constants of the loss. The reference never changes (the base
model is frozen), so training keeps each pair's two reference values after their
first pass (:class:`ReferenceCache`, keyed by the pair's ``row`` in the client's
training set): from the second epoch or round on a step runs two forward passes, not
four. The values are a function of the pair and the public base model only, and they
never leave the client.

Held-out metrics: ``eval-loss`` (mean DPO loss), ``eval-accuracy`` (share of pairs
with ``r(y_w) > r(y_l)``, a tie counting one half: before training the policy *is*
the reference, every reward is 0, and the accuracy is chance, 0.5) and
``eval-reward-margin`` (mean ``r(y_w) - r(y_l)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual alias
from torch.utils.data import DataLoader

from fedtune.data.collate import IGNORE
from fedtune.train import EvalResult

__all__ = [
    "ReferenceCache",
    "dpo_loss",
    "evaluate_preferences",
    "pair_rewards",
    "reference_policy",
    "sequence_logprob",
]

#: The reward-margin metric's record key.
MARGIN = "eval-reward-margin"


@contextlib.contextmanager
def reference_policy(model: nn.Module) -> Iterator[None]:
    """Run a block as ``π_ref``: the adapter disabled, every ``requires_grad`` kept as it was.

    PEFT's ``disable_adapter()`` re-enables the adapter on exit through
    ``set_adapter``, which marks *every* adapter tensor trainable again: that would
    unfreeze FFA-LoRA's ``A`` and change the set of tensors Opacus and the payload
    count on. The flags are put back exactly. ``model`` may be Opacus'
    ``GradSampleModule`` (the PEFT model is its ``_module``).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    peft_model: Any = getattr(model, "_module", model)
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def sequence_logprob(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``log π(y | x)`` per row: the sum of the answer tokens' log-probabilities, shape (B,)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1)


def _half(batch: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, labels)`` of the chosen (``""``) or rejected half."""
    return tuple(batch[f"{prefix}{key}"] for key in ("input_ids", "attention_mask", "labels"))


def _reference_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π_ref(y_w|x), log π_ref(y_l|x))`` per row, without gradients."""
    with torch.no_grad(), reference_policy(model):
        return sequence_logprob(model, *_half(batch, "")), sequence_logprob(
            model, *_half(batch, "rejected_")
        )


class ReferenceCache:
    """Each training pair's reference log-probabilities, computed on its first pass only.

    Keyed by the batch's ``row`` (the pair's index in one client's training set): one
    cache belongs to one training set. A batch with a row not seen yet computes the
    reference for the whole batch, exactly as without a cache.
    """

    def __init__(self) -> None:
        self._values: dict[int, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def logprobs(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [int(r) for r in batch["row"]]
        if any(r not in self._values for r in rows):
            chosen, rejected = _reference_logprobs(model, batch)
            for r, w, lose in zip(rows, chosen.tolist(), rejected.tolist(), strict=True):
                self._values[r] = (w, lose)
            return chosen, rejected
        device = batch["input_ids"].device
        values = torch.tensor([self._values[r] for r in rows], device=device).reshape(-1, 2)
        return values[:, 0], values[:, 1]


def pair_rewards(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    beta: float,
    reference: ReferenceCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards ``(r(y_w), r(y_l))`` per row; the policy terms keep their graph."""
    chosen = sequence_logprob(model, *_half(batch, ""))
    rejected = sequence_logprob(model, *_half(batch, "rejected_"))
    if reference is not None and "row" in batch:
        ref_chosen, ref_rejected = reference.logprobs(model, batch)
    else:
        ref_chosen, ref_rejected = _reference_logprobs(model, batch)
    return beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def dpo_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    beta: float,
    reference: ReferenceCache | None = None,
) -> torch.Tensor:
    """Mean over pairs of ``-log σ(r(y_w) - r(y_l))`` (see the module docstring)."""
    reward_w, reward_l = pair_rewards(model, batch, beta=beta, reference=reference)
    return -F.logsigmoid(reward_w - reward_l).mean()


@torch.no_grad()
def evaluate_preferences(
    model: nn.Module, loader: DataLoader[Any], *, device: torch.device, beta: float
) -> EvalResult:
    """Mean DPO loss, preference accuracy and mean reward margin over ``loader``."""
    model.to(device).eval()
    total, correct, margin, seen = 0.0, 0.0, 0.0, 0
    for raw in loader:
        batch = {k: v.to(device) for k, v in raw.items()}
        reward_w, reward_l = pair_rewards(model, batch, beta=beta)
        diff = (reward_w - reward_l).double()
        total += float(-F.logsigmoid(diff).sum())
        correct += float((diff > 0).sum()) + 0.5 * float((diff == 0).sum())
        margin += float(diff.sum())
        seen += len(diff)
    if not seen:
        return EvalResult(math.nan, math.nan, 0, {MARGIN: math.nan})
    return EvalResult(total / seen, correct / seen, seen, {MARGIN: margin / seen})


@torch.no_grad()
def example_metrics_preferences(
    model: nn.Module, loader: DataLoader[Any], *, device: torch.device, beta: float
) -> dict[str, list[float]]:
    """Per pair: DPO loss, preference accuracy (1, ½ on a tie, 0) and reward margin."""
    model.to(device).eval()
    out: dict[str, list[float]] = {"eval-loss": [], "eval-accuracy": [], MARGIN: []}
    for raw in loader:
        batch = {k: v.to(device) for k, v in raw.items()}
        reward_w, reward_l = pair_rewards(model, batch, beta=beta)
        diff = (reward_w - reward_l).double()
        out["eval-loss"] += (-F.logsigmoid(diff)).tolist()
        out["eval-accuracy"] += ((diff > 0).double() + 0.5 * (diff == 0).double()).tolist()
        out[MARGIN] += diff.tolist()
    return out
