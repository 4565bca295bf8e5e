"""The local training loop every task shares, and what it reports.

The device is chosen once per process: ``cuda`` when present (``device = "auto"``),
else ``cpu``. A task's held-out evaluation is the task's own
(:meth:`fedtune.tasks.base.Task.evaluate`); batches come padded by its collate function.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedtune.config import Device, Precision, TrainConfig
from fedtune.data.collate import item_lengths


def select_device(preference: Device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("`device` is 'cuda' but no CUDA device is available; use 'auto'.")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def compute_precision(precision: Precision, device: torch.device) -> torch.autocast:
    """The context of a training forward pass: bf16 autocast for ``"bf16"``, else nothing.

    Under ``torch.autocast`` matrix products run in bfloat16 while parameters stay
    float32; the backward pass follows the forward's dtypes. Opacus' per-example
    gradient hooks then receive bfloat16 activations and output gradients and return
    bfloat16 per-example gradients, which fedtune's DP optimizer copies to float64
    (``dp-noise = "grid"``) or to the parameters' float32 (``"float"``) before it computes
    norms and clips (:mod:`fedtune.privacy.optimizer`): the bound holds on exactly the
    values that are summed. Works on CUDA and CPU (tests/test_precision.py).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Batchable(Protocol):
    """A map-style dataset that knows how to collate its items into a batch."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]: ...

    def collate_fn(self):  # type: ignore[no-untyped-def]
        """A function that turns a list of items into one padded batch."""


#: ``loss_fn(model, batch)``: the batch's loss as a mean over its rows (examples).
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def make_loader(
    data: Batchable,
    *,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    by_length: bool = False,
) -> DataLoader[Any]:
    """A DataLoader with per-batch padding; shuffling draws from ``generator``.

    ``by_length`` (held-out evaluation, where order does not matter): items in order
    of their length, so that each batch pads to rows of about its own length (half
    the time on WordNet definitions). Needs the dataset's ``lengths()``; without one
    the order is the dataset's.
    """
    lengths = item_lengths(data) if by_length and not shuffle else None
    order = None if lengths is None else sorted(range(len(lengths)), key=lengths.__getitem__)
    return DataLoader(
        data,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=order,
        generator=generator,
        collate_fn=data.collate_fn(),
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over the parameters that require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training did."""

    loss: float
    steps: int
    num_examples: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Held-out loss and accuracy of one client, and any further metrics of its task."""

    loss: float
    accuracy: float
    num_examples: int
    #: Further held-out metrics of the task, by record key (e.g. ``"eval-margin"``).
    extra: Mapping[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Every held-out metric by record key: ``eval-loss``, ``eval-accuracy``, extras."""
        return {"eval-loss": self.loss, "eval-accuracy": self.accuracy, **self.extra}


def train_local(
    model: nn.Module,
    loader: DataLoader[Any],
    cfg: TrainConfig,
    *,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    private: bool = False,
) -> TrainResult:
    """Train the trainable parameters for ``local-epochs`` epochs.

    ``optimizer`` may be supplied already wrapped (e.g. a DP optimizer); by default
    AdamW over the parameters that require gradients. ``loss_fn`` replaces the
    model's own loss (it must be a mean over the batch's rows, as DP-SGD assumes).

    ``private``: ``optimizer`` is Opacus' ``DPOptimizer`` over Poisson batches. An
    empty batch then still takes its step, of pure noise: the accounting counts every
    step, and a skipped one would show in the update (no noise added for it). A
    Poisson batch split into physical parts (:mod:`fedtune.privacy.virtual`) counts
    as one step: the optimizer only accumulates on every part but the last.
    """
    model.to(device).train()
    if optimizer is None:
        optimizer = make_optimizer(model, cfg)
    start = time.perf_counter()
    total, steps, seen = 0.0, 0, 0
    for _ in range(cfg.local_epochs):
        for raw in loader:
            if len(raw["labels"]) == 0:  # Poisson sampling can draw an empty batch
                if private:
                    _noise_only_step(optimizer)
                    steps += 1
                continue
            batch = {k: v.to(device) for k, v in raw.items()}
            optimizer.zero_grad(set_to_none=True)
            with compute_precision(cfg.precision, device):
                loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch["labels"])
            seen += len(batch["labels"])
            steps += 0 if getattr(optimizer, "_is_last_step_skipped", False) else 1
    mean = total / seen if seen else math.nan
    return TrainResult(
        loss=mean, steps=steps, num_examples=seen, seconds=time.perf_counter() - start
    )


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """A DP-SGD step on an empty batch: Opacus clips nothing and adds its noise."""
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:  # type: ignore[attr-defined]  # a DPOptimizer
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()
