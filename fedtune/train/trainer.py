"""The plain trainer: one client's data and the worker's model, trained and scored without DP.

:class:`Trainer` is what a client needs to learn and to measure, and nothing it
needs to *release*: its tokenised partition (from the worker's bounded LRU,
:mod:`fedtune.train.shared`), the worker's LoRA model and codec, the seeded initial
adapter, one round of local training (:meth:`Trainer.fit`) and exact held-out
metrics (:meth:`Trainer.score`). Release keying, the privacy ledger, the DP levels,
evaluation releases and canaries sit one layer above, in
:class:`fedtune.train.runtime.ClientRuntime`; DP-SGD is the example level's own
training (:mod:`fedtune.train.levels`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fedtune import model as fmodel
from fedtune.config import RunConfig
from fedtune.data.memo import data_key
from fedtune.tasks import get_task
from fedtune.tasks.base import ClientDatasets
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
from fedtune.train.shared import SharedModel, release_model, worker_cache

__all__ = ["EVAL_BATCH", "Trainer"]

#: Held-out batches are this large (sorted by length: evaluation pads little).
EVAL_BATCH = 64


class Trainer:
    """One client's partition on the worker's shared model, trained and scored in the clear.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration.
    partition_id, num_partitions : int
        Which partition of the data this client holds.
    test_fraction : float | None
        The held-out fraction of this client's data (a node's own policy); ``None``
        keeps the run config's.
    secret_context : Path | None
        A key holder's CKKS secret context (the codec decrypts with it).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        partition_id: int,
        num_partitions: int,
        test_fraction: float | None = None,
        secret_context: Path | None = None,
    ) -> None:
        self.cfg = cfg
        fraction = cfg.data.test_fraction if test_fraction is None else test_fraction
        #: The run config as this client's data sees it: its own held-out fraction.
        self.data_cfg = replace(cfg, data=replace(cfg.data, test_fraction=fraction))
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.device = select_device(cfg.train.device)
        self.task = get_task(cfg.model.task)
        cache = worker_cache()
        cache.partitions.resize(cfg.federation.partition_cache_size)
        sets = self.datasets
        self.label_names = list(sets.label_names)
        self._num_train = len(sets.train_set)
        self.loss_fn: LossFn | None = self.task.loss_fn(cfg)
        self._shared: SharedModel = cache.model(
            cfg.model,
            num_labels=len(self.label_names),
            seed=cfg.federation.seed,
            device=self.device,
        )
        self.codec = cache.codec(
            cfg.crypto.encryption_backend, length=self.initial.size, context=secret_context
        )

    @property
    def datasets(self) -> ClientDatasets:
        """This client's tokenised partition, from the worker's LRU (rebuilt if evicted)."""
        cfg = self.data_cfg
        data = data_key(cfg.data, seed=cfg.federation.seed)
        key = (cfg.model, data, self.partition_id, self.num_partitions)

        def build() -> ClientDatasets:
            tokenizer = worker_cache().tokenizer(cfg.model)
            return self.task.client_datasets(
                cfg, tokenizer, partition_id=self.partition_id, num_partitions=self.num_partitions
            )

        return worker_cache().partitions.get(key, build)

    @property
    def train_set(self) -> Batchable:
        """This client's tokenised training examples."""
        return self.datasets.train_set

    @property
    def test_set(self) -> Batchable:
        """This client's tokenised held-out examples."""
        return self.datasets.test_set

    @property
    def model(self) -> torch.nn.Module:
        """The worker's shared model; set this client's adapter vector in before use."""
        return self._shared.model

    @model.setter
    def model(self, module: torch.nn.Module) -> None:
        # DP-SGD hands back the model it unwrapped (the same module, Opacus' hooks removed).
        self._shared.model = module

    @property
    def initial(self) -> NDArray[np.float64]:
        """The seeded initial adapter every client starts round 1 from (read-only)."""
        return self._shared.initial

    @property
    def num_train_examples(self) -> int:
        """Examples this client trains on each epoch."""
        return self._num_train

    def fit(self, seed: int, canaries: Any = None) -> TrainResult:
        """One round of local training without DP-SGD, from the adapter set in the model.

        ``canaries`` (audits without DP): a :class:`fedtune.privacy.canaries.CanaryStep`
        whose drawn canaries add ``-C e_j / batch-size`` to each step's mean gradient.
        """
        generator = torch.Generator().manual_seed(seed)
        batch_size = self.cfg.train.batch_size
        loader = make_loader(
            self.train_set, batch_size=batch_size, shuffle=True, generator=generator
        )
        optimizer = None
        if canaries is not None:
            optimizer = make_optimizer(self.model, self.cfg.train)
            params = [p for p in self.model.parameters() if p.requires_grad]
            rate = min(1.0, batch_size / max(1, self.num_train_examples))

            def add_canaries(*_: object) -> None:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                canaries.add(grads, sample_rate=rate, scale=1.0 / batch_size)

            optimizer.register_step_pre_hook(add_canaries)
        try:
            return train_local(
                self.model,
                loader,
                self.cfg.train,
                device=self.device,
                loss_fn=self.loss_fn,
                optimizer=optimizer,
            )
        finally:
            release_model(self.model)  # the next client of this worker starts clean

    def eval_loader(self) -> Any:
        """The held-out examples in length-sorted batches of :data:`EVAL_BATCH`."""
        return make_loader(self.test_set, batch_size=EVAL_BATCH, shuffle=False, by_length=True)

    def score(self, vector: NDArray[np.float64]) -> EvalResult:
        """Exact held-out metrics of the adapter ``vector``."""
        fmodel.set_adapter_vector(self.model, vector)
        return self.task.evaluate(self.model, self.eval_loader(), device=self.device, cfg=self.cfg)

    def example_metrics(self, vector: NDArray[np.float64]) -> Mapping[str, Sequence[float]]:
        """Each held-out metric per example for the adapter ``vector`` (a DP evaluation)."""
        fmodel.set_adapter_vector(self.model, vector)
        return self.task.example_metrics(  # type: ignore[attr-defined]
            self.model, self.eval_loader(), device=self.device, cfg=self.cfg
        )
