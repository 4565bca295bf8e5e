"""Local training on each client (``local-epochs``, ``batch-size``, ``optimizer``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fedtune.config._checks import choice, require

__all__ = ["Device", "OptimizerName", "TrainConfig"]

Device = Literal["auto", "cpu", "cuda"]
OptimizerName = Literal["adamw", "sgd"]


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client.

    ``optimizer = "sgd"`` (with ``momentum``) is the usual choice under DP-SGD:
    Adam's per-coordinate normalisation turns the DP noise into full-size steps in
    every coordinate, which drowns the signal of a small data set.

    ``physical-batch-size`` bounds the rows of one forward/backward pass under
    DP-SGD: a larger Poisson batch is sorted by length and split into parts whose
    clipped per-example gradients are summed before the one noisy step
    (:mod:`fedtune.privacy.virtual`). Same mechanism, same accounting; less padding
    and bounded memory for large batches. 0 = never split.

    ``beta`` is DPO's β (``task = "preference"``): how far the implicit reward
    ``β log(π / π_ref)`` lets the policy move from the reference.
    """

    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    optimizer: OptimizerName = "adamw"
    momentum: float = 0.9
    device: Device = "auto"
    beta: float = 0.1
    physical_batch_size: int = 128

    def __post_init__(self) -> None:
        require(self.local_epochs >= 1, "local-epochs", self.local_epochs, "must be >= 1")
        require(self.batch_size >= 1, "batch-size", self.batch_size, "must be >= 1")
        require(self.learning_rate > 0, "learning-rate", self.learning_rate, "must be > 0")
        require(self.weight_decay >= 0, "weight-decay", self.weight_decay, "must be >= 0")
        choice("optimizer", self.optimizer, get_args(OptimizerName))
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        choice("device", self.device, get_args(Device))
        require(
            self.physical_batch_size >= 0,
            "physical-batch-size",
            self.physical_batch_size,
            "must be >= 0 (0 = never split a DP-SGD batch)",
        )
        require(self.beta > 0, "beta", self.beta, "must be > 0 (DPO's β, e.g. 0.1)")
