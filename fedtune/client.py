"""One client's work, independent of Flower: decode the global adapter, train, encode.

:class:`ClientRuntime` holds what a client keeps between rounds in one process:
its data partition (tokenised), the model with its LoRA adapter, the adapter's
seeded initial value and its codec. ``clients/app.py`` turns Flower messages into
calls on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from fedtune import data as fdata
from fedtune import model as fmodel
from fedtune.aggregation import WeightedSum, prescale
from fedtune.config import RunConfig
from fedtune.train import EncodedDataset, EvalResult, TrainResult, evaluate, make_loader, select_device, train_local
from fedtune.wire import Codec, PlainCodec, WirePayload


@dataclass(frozen=True)
class GlobalState:
    """The aggregate a client receives: a payload of ``sum n_k w_k`` and ``sum n_k``."""

    payload: WirePayload
    num_examples: int


@dataclass(frozen=True)
class TrainOutcome:
    """What a client sends back after training."""

    payload: WirePayload
    num_examples: int
    result: TrainResult


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed of its own for each (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def make_codec(cfg: RunConfig, *, length: int, secret_context: Path | None = None) -> Codec:
    """The client's codec: plaintext, or CKKS with the secret context at ``secret_context``."""
    if secret_context is None:
        return PlainCodec(length=length)
    from fedtune import crypto  # noqa: PLC0415 - only needed with encryption
    from fedtune.wire import CkksCodec  # noqa: PLC0415

    return CkksCodec(crypto.load_context(secret_context), length=length)


class ClientRuntime:
    """A client's partition, model and codec, built once per process."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        partition_id: int,
        num_partitions: int,
        secret_context: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        seed = cfg.federation.seed
        dataset = fdata.load_data(cfg.data, seed=seed)
        self.label_names = dataset.label_names
        self.split = fdata.client_data(
            dataset, cfg.data, partition_id=partition_id, num_partitions=num_partitions, seed=seed
        )
        self.device = select_device(cfg.train.device)
        tokenizer = fmodel.load_tokenizer(cfg.model)
        max_len = cfg.data.max_seq_length
        self.train_set = EncodedDataset(
            tokenizer, self.split.train_texts, self.split.train_labels, max_length=max_len
        )
        self.test_set = EncodedDataset(
            tokenizer, self.split.test_texts, self.split.test_labels, max_length=max_len
        )
        self.model = fmodel.build_model(cfg.model, num_labels=len(self.label_names), seed=seed)
        self.initial = fmodel.get_adapter_vector(self.model)
        self.codec = make_codec(cfg, length=self.initial.size, secret_context=secret_context)

    @property
    def num_train_examples(self) -> int:
        """Examples this client trains on each epoch."""
        return len(self.train_set)

    def global_vector(self, state: GlobalState | None) -> NDArray[np.float64]:
        """The current global adapter: the seeded initial one in round 1, else ``S / N``."""
        if state is None:
            return self.initial.copy()
        self.codec.validate(state.payload, aggregate=True)
        total = self.codec.decode(state.payload)
        return WeightedSum(total=total, num_examples=state.num_examples).mean()

    def train(self, state: GlobalState | None, *, server_round: int) -> TrainOutcome:
        """Train from the global adapter; return the encoded ``n_k w_k``."""
        fmodel.set_adapter_vector(self.model, self.global_vector(state))
        seed = round_seed(self.cfg.federation.seed, server_round, self.partition_id)
        generator = torch.Generator().manual_seed(seed)
        loader = make_loader(
            self.train_set, batch_size=self.cfg.train.batch_size, shuffle=True, generator=generator
        )
        # Dropout draws from torch's global RNG: seed it too, so a round is reproducible.
        with fmodel.seeded(seed):
            result = train_local(self.model, loader, self.cfg.train, device=self.device)
        n = self.num_train_examples
        payload = self.codec.encode(prescale(fmodel.get_adapter_vector(self.model), n))
        return TrainOutcome(payload=payload, num_examples=n, result=result)

    def evaluate(self, state: GlobalState | None) -> EvalResult:
        """Held-out loss and accuracy of the global adapter on this client's test split."""
        fmodel.set_adapter_vector(self.model, self.global_vector(state))
        loader = make_loader(self.test_set, batch_size=64, shuffle=False)
        return evaluate(self.model, loader, device=self.device)
