"""Local training on each client (``local-epochs``, ``batch-size``, ``optimizer``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from fedtune.config._checks import choice, require

__all__ = ["Device", "OptimizerName", "Precision", "TrainConfig"]

Device = Literal["auto", "cpu", "cuda"]
OptimizerName = Literal["adamw", "sgd"]
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client.

    Each field's ``metadata["help"]`` is its key's one description (``--help`` and
    ``docs/configuration.md`` are generated from it, :mod:`fedtune.config.reference`).
    """

    local_epochs: int = field(
        default=1, metadata={"help": "Passes over its training data a client makes per round."}
    )
    batch_size: int = field(
        default=16,
        metadata={
            "help": "Local batch size; under DP-SGD the expected Poisson batch "
            "(`q = batch-size / n_k`)."
        },
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "Local learning rate (> 0)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Local weight decay (>= 0)."})
    optimizer: OptimizerName = field(
        default="adamw",
        metadata={
            "help": "`adamw`, or `sgd` with `momentum`, the usual choice under DP-SGD: "
            "Adam's per-coordinate normalisation turns the DP noise into full-size steps "
            "in every coordinate, which drowns the signal of a small data set (the DP "
            "recipe: docs/privacy.md)."
        },
    )
    momentum: float = field(
        default=0.9, metadata={"help": 'SGD momentum, in [0, 1) (`optimizer = "sgd"`).'}
    )
    device: Device = field(
        default="auto", metadata={"help": "`auto` (CUDA when present, else CPU), `cpu` or `cuda`."}
    )
    precision: Precision = field(
        default="fp32",
        metadata={
            "help": "Compute of the training forward pass: `fp32`, or `bf16` (torch.autocast "
            "to bfloat16 on CUDA or CPU; weights, LoRA tensors and the optimizer stay "
            "float32, DP-SGD clips each per-example gradient in float64 with `dp-noise = grid`, "
            "float32 with `float`). Same DP release "
            "and accounting (docs/scale.md)."
        },
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "Preference: DPO's β, how far the implicit reward `β log(π / π_ref)` lets "
            "the policy move from the reference."
        },
    )
    physical_batch_size: int = field(
        default=128,
        metadata={
            "help": "DP-SGD: the most rows of one forward/backward pass; a larger Poisson "
            "batch is sorted by length and split into parts whose clipped per-example "
            "gradients are summed before the one noisy step (same step, same accounting; "
            "less padding, bounded memory; fedtune/privacy/virtual.py). 0 = never split."
        },
    )

    def __post_init__(self) -> None:
        require(self.local_epochs >= 1, "local-epochs", self.local_epochs, "must be >= 1")
        require(self.batch_size >= 1, "batch-size", self.batch_size, "must be >= 1")
        require(self.learning_rate > 0, "learning-rate", self.learning_rate, "must be > 0")
        require(self.weight_decay >= 0, "weight-decay", self.weight_decay, "must be >= 0")
        choice("optimizer", self.optimizer, get_args(OptimizerName))
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        choice("device", self.device, get_args(Device))
        choice("precision", self.precision, get_args(Precision))
        require(
            self.physical_batch_size >= 0,
            "physical-batch-size",
            self.physical_batch_size,
            "must be >= 0 (0 = never split a DP-SGD batch)",
        )
        require(self.beta > 0, "beta", self.beta, "must be > 0 (DPO's β, e.g. 0.1)")
