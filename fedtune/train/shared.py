"""What the clients one worker process serves share: base model, tokenizer, codec, data.

A simulation worker (a Ray actor) serves many clients in turn, and in a
federation of a thousand clients most of them only a few times. Building a
model per client costs its full size in memory for every client ever served;
this module keeps one per process instead:

* one base model with its LoRA adapter per model config, label count and seed
  (:meth:`WorkerCache.model`). It holds no client's state between uses: a client
  sets its adapter vector in (LoRA matrices *and* the classifier head: every
  trainable tensor is in the vector), trains or evaluates, reads the vector back,
  and :func:`release_model` drops the gradients; optimizers are made per round;
  Opacus' wrapper is removed after each round (:meth:`DPTraining.close`);
* one tokenizer per model config, one codec per key file;
* a bounded LRU of tokenised client partitions (``partition-cache-size``
  entries): a partition that was evicted is rebuilt, deterministically, from the
  data set that :mod:`fedtune.data.memo` read and partitioned once per process.

What stays per client (:class:`fedtune.train.runtime.ClientRuntime`): its name and
partition id, its privacy plan, ledger and step guard, and the sizes of its data.

The cache is created on first use (nothing at import) and lives as long as the
process; :func:`clear_worker_cache` empties it (tests).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedtune import model as fmodel
from fedtune.data.memo import clear_process_memos, file_stamp
from fedtune.secure import run_codec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedtune.config import ModelConfig
    from fedtune.secure.codec import Codec
    from fedtune.tasks.base import ClientDatasets

__all__ = [
    "PartitionCache",
    "SharedModel",
    "WorkerCache",
    "clear_worker_cache",
    "process_model",
    "release_model",
    "worker_cache",
]


@dataclass
class SharedModel:
    """The worker's model for one model config, and its seeded initial adapter."""

    #: The PEFT model; clients set their adapter vector in before each use.
    model: nn.Module
    #: The adapter vector as built (read-only: ``flags.writeable`` is off).
    initial: NDArray[np.float64]


class PartitionCache:
    """An LRU of tokenised client partitions holding at most ``capacity`` of them.

    Parameters
    ----------
    capacity : int
        ``partition-cache-size``: how many clients' tokenised partitions are kept.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, ClientDatasets] = OrderedDict()
        #: How many partitions were tokenised (first use or after an eviction).
        self.builds = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, build: Callable[[], ClientDatasets]) -> ClientDatasets:
        """The partition under ``key``, built (and the oldest evicted) when absent."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = build()
        self.builds += 1
        self._entries[key] = value
        self.resize(self.capacity)
        return value

    def resize(self, capacity: int) -> None:
        """Keep at most ``capacity`` partitions, dropping the least recently used."""
        self.capacity = capacity
        while len(self._entries) > capacity:
            self._entries.popitem(last=False)


@dataclass
class WorkerCache:
    """The process-wide objects every client of a worker shares (see the module docstring)."""

    models: dict[Hashable, SharedModel] = field(default_factory=dict)
    tokenizers: dict[Hashable, Any] = field(default_factory=dict)
    codecs: dict[Hashable, Codec] = field(default_factory=dict)
    partitions: PartitionCache = field(default_factory=lambda: PartitionCache(1))

    def tokenizer(self, cfg: ModelConfig) -> Any:
        """The tokenizer of ``cfg``'s base model, loaded once."""
        key = (cfg.task, cfg.model_path)
        if key not in self.tokenizers:
            self.tokenizers[key] = fmodel.load_tokenizer(cfg)
        return self.tokenizers[key]

    def model(
        self, cfg: ModelConfig, *, num_labels: int, seed: int, device: torch.device
    ) -> SharedModel:
        """The LoRA model of ``cfg`` with a ``num_labels`` head, seeded, on ``device``."""
        key = (cfg, num_labels, seed, str(device))
        if key not in self.models:
            model = fmodel.build_model(cfg, num_labels=num_labels, seed=seed, quantize_for=device)
            model.to(device)
            initial = fmodel.get_adapter_vector(model)
            initial.flags.writeable = False
            self.models[key] = SharedModel(model=model, initial=initial)
        return self.models[key]

    def codec(self, backend: str, *, length: int, context: Path | None) -> Codec:
        """A key holder's codec on ``context`` (plain without one), loaded once per file."""
        key = (backend, length, file_stamp(context) if context is not None else None)
        if key not in self.codecs:
            self.codecs[key] = run_codec(backend, length=length, context=context)
        return self.codecs[key]


_CACHE: list[WorkerCache] = []


def worker_cache() -> WorkerCache:
    """This process's :class:`WorkerCache`, created on first use."""
    if not _CACHE:
        _CACHE.append(WorkerCache())
    return _CACHE[0]


def process_model(cfg: ModelConfig, *, num_labels: int, seed: int) -> SharedModel:
    """This process's CPU model of ``cfg``: built once per process, then shared.

    The preflight checks the model by building it here; the simulation driver then
    reads the adapter length from it (the server is told, it builds none) and the
    export writes the final adapter with it, so a driver process builds one model.
    """
    import torch  # the cache itself imports no torch

    return worker_cache().model(cfg, num_labels=num_labels, seed=seed, device=torch.device("cpu"))


def clear_worker_cache() -> None:
    """Drop this process's shared models, tokenizers, codecs, partitions and data memos."""
    _CACHE.clear()
    clear_process_memos()


def release_model(model: nn.Module) -> None:
    """Leave nothing of the last client on a shared model: drop every gradient."""
    for p in model.parameters():
        p.grad = None
