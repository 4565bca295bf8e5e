"""A client's training: the loop every task shares, the plain trainer, the private round.

Read bottom up: ``loop`` trains and reports; ``trainer`` is the plain
:class:`~fedtune.train.trainer.Trainer` (one client's data on the worker's model,
trained and scored in the clear); ``plan`` fixes σ, q and steps for the run;
``levels`` holds the DP levels (example: DP-SGD inside training; client: a transform
of the update); ``keys`` keys a release (run nonce, input hash, noise);
``eval_release`` is a DP evaluation; ``runtime`` the
:class:`~fedtune.train.runtime.ClientRuntime` that runs one round above the trainer
for :mod:`fedtune.node.round`. Only ``loop`` is imported here (it is what tasks need);
import the rest from its module.
"""

from __future__ import annotations

from fedtune.train.loop import (
    Batchable,
    EvalResult,
    LossFn,
    TrainResult,
    make_loader,
    make_optimizer,
    select_device,
    train_local,
)

__all__ = [
    "Batchable",
    "EvalResult",
    "LossFn",
    "TrainResult",
    "make_loader",
    "make_optimizer",
    "select_device",
    "train_local",
]
