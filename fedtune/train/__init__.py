"""A client's training: the loop every task shares, its DP plan and levels, its round.

``loop`` trains and reports, ``plan`` fixes σ, q and steps for the run, ``levels``
holds the DP levels (example: DP-SGD inside training; client: a transform of the
update), ``release`` the DP round as a recorded release, ``seeds`` the round seeds,
``runtime`` the :class:`~fedtune.train.runtime.ClientRuntime` that ties them
together for ``fedtune/apps/client/app.py``. Only ``loop`` is imported here (it is what tasks
need); import the rest from its module.
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
