"""One client's work, independent of Flower: decode the global adapter, train, encode.

:class:`ClientRuntime` holds what a client keeps between rounds in one process:
its data partition (tokenised), the model with its LoRA adapter, the adapter's
seeded initial value and its codec. ``clients/app.py`` turns Flower messages into
calls on it.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from fedtune import data as fdata
from fedtune import model as fmodel
from fedtune.aggregation import WeightedSum, prescale
from fedtune.config import RunConfig
from fedtune.privacy import PrivacyLedger
from fedtune.train import (
    Batchable,
    EncodedDataset,
    EvalResult,
    LossFn,
    TrainResult,
    evaluate,
    make_loader,
    select_device,
    train_local,
)
from fedtune.wire import Codec, PlainCodec, WirePayload


@dataclass(frozen=True)
class GlobalState:
    """The aggregate a client receives: a payload of ``sum n_k w_k`` and ``sum n_k``."""

    payload: WirePayload
    num_examples: int


@dataclass(frozen=True)
class TrainOutcome:
    """What a client sends back after training, or why it declined."""

    payload: WirePayload | None
    num_examples: int
    result: TrainResult | None
    epsilon: float | None = None
    declined: str = ""


@dataclass(frozen=True)
class PrivacyPlan:
    """One round's DP parameters, fixed for the whole run."""

    level: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    sampled_clients: int


def sampled_clients(cfg: RunConfig) -> int:
    """How many clients the server samples per round (as :class:`FedTuneStrategy` does)."""
    fed = cfg.federation
    return min(
        fed.num_clients, max(math.ceil(fed.fraction_train * fed.num_clients), fed.min_clients)
    )


def privacy_plan(cfg: RunConfig, *, num_train_examples: int) -> PrivacyPlan:
    """σ, q and steps per round; σ calibrated once for the planned rounds if not given.

    Example level: ``q = batch-size / n_k``, ``steps = local-epochs * floor(1 / q)``
    (one Opacus Poisson epoch). Client level: ``q = m / N`` with ``m`` sampled
    clients of ``N``, one step per round.
    """
    from fedtune.privacy import calibrate_noise  # noqa: PLC0415

    p, fed = cfg.privacy, cfg.federation
    m = sampled_clients(cfg)
    if p.dp == "example":
        q = min(1.0, cfg.train.batch_size / num_train_examples)
        steps = cfg.train.local_epochs * int(1 / q)
    else:
        q, steps = m / fed.num_clients, 1
    sigma = p.noise_multiplier or calibrate_noise(
        target_epsilon=p.target_epsilon,
        target_delta=p.target_delta,
        sample_rate=q,
        steps=steps * fed.num_rounds,
        accountant=p.accountant,
    )
    return PrivacyPlan(
        level=p.dp, noise_multiplier=sigma, sample_rate=q, steps=steps, sampled_clients=m
    )


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed of its own for each (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def node_round_seed(node_secret: bytes, seed: int, server_round: int, name: str) -> int:
    """A deployed node's seed for one round: keyed by a secret only the node holds.

    The run seed is public (it is in the run config), so noise drawn from it alone
    could be recomputed by anyone who reads the config, and nodes with their own
    data (all partition 0) would draw the same noise. A node mixes in
    ``STATE_DIR/noise-seed.key`` (32 random bytes, made once, mode 0600), so a
    retried or resumed round still reproduces the node's own release while nobody
    else can.
    """
    message = f"{seed}/{server_round}/{name}".encode()
    digest = hashlib.blake2b(message, key=node_secret, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def load_node_secret(state_dir: Path) -> bytes:
    """``STATE_DIR/noise-seed.key``, made with ``secrets`` on first use (mode 0600)."""
    path = state_dir / "noise-seed.key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this node made it first
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) != 32:
        raise ValueError(f"{str(path)!r} must hold 32 bytes, got {len(data)}; remove it.")
    return data


def make_codec(*, length: int, secret_context: Path | None = None) -> Codec:
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
        name: str | None = None,
        secret_context: Path | None = None,
        privacy_dir: Path | None = None,
        state_dir: Path | None = None,
        run_id: str = "run",
    ) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.name = name or f"client-{partition_id}"
        self.run_id = run_id
        self.privacy_dir = privacy_dir
        self.state_dir = state_dir
        seed = cfg.federation.seed
        self.device = select_device(cfg.train.device)
        tokenizer = fmodel.load_tokenizer(cfg.model)
        self.loss_fn: LossFn | None = None
        self.train_set: Batchable
        self.test_set: Batchable
        if cfg.model.task == "causal-lm":
            from fedtune import lm_train  # noqa: PLC0415

            self.label_names = cfg.data.labels
            lm = lm_train.client_datasets(
                cfg, tokenizer, partition_id=partition_id, num_partitions=num_partitions
            )
            self.train_set, self.test_set = lm.train_set, lm.test_set
            self.loss_fn = lm_train.answer_loss
        else:
            dataset = fdata.load_data(cfg.data, seed=seed)
            self.label_names = dataset.label_names
            self.split = fdata.client_data(
                dataset,
                cfg.data,
                partition_id=partition_id,
                num_partitions=num_partitions,
                seed=seed,
            )
            max_len = cfg.data.max_seq_length
            self.train_set = EncodedDataset(
                tokenizer, self.split.train_texts, self.split.train_labels, max_length=max_len
            )
            self.test_set = EncodedDataset(
                tokenizer, self.split.test_texts, self.split.test_labels, max_length=max_len
            )
        self.model = fmodel.build_model(cfg.model, num_labels=len(self.label_names), seed=seed)
        self.model.to(self.device)
        self.initial = fmodel.get_adapter_vector(self.model)
        self.codec = make_codec(length=self.initial.size, secret_context=secret_context)
        self._plan: PrivacyPlan | None = None
        if cfg.privacy.enabled and privacy_dir is None:
            raise ValueError("DP is on but the client has no directory for its privacy ledger.")

    @property
    def plan(self) -> PrivacyPlan:
        """This client's DP parameters (calibrated on first use)."""
        if self._plan is None:
            self._plan = privacy_plan(self.cfg, num_train_examples=self.num_train_examples)
        return self._plan

    def ledger(self) -> PrivacyLedger:
        """This client's append-only privacy ledger."""
        if self.privacy_dir is None:
            raise ValueError("This client has no privacy directory (DP is off).")
        return PrivacyLedger(self.privacy_dir / f"{self.name}.jsonl")

    @property
    def num_train_examples(self) -> int:
        """Examples this client trains on each epoch."""
        return len(self.train_set)

    def keep_global(self, state: GlobalState | None, *, server_round: int) -> None:
        """On a node, keep the newest global sum in ``STATE_DIR/checkpoint``.

        With the resolved ``STATE_DIR/config.toml`` beside it, ``fedtune export
        STATE_DIR --key SECRET`` writes the PEFT adapter on the node itself, from the
        same files a server checkpoint has (the server cannot: it holds no key).
        """
        if self.state_dir is None or state is None:
            return
        from fedtune.checkpoint import (  # noqa: PLC0415
            Checkpoint,
            CheckpointError,
            load_checkpoint,
            save_checkpoint,
        )

        directory = self.state_dir / "checkpoint"
        try:
            if load_checkpoint(directory).round >= server_round:
                return
        except CheckpointError:
            pass
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = replace(
            self.cfg, data=replace(self.cfg.data, label_names=",".join(self.label_names))
        )
        (self.state_dir / "config.toml").write_text(config.to_toml())
        payload = self.codec.validate(state.payload, aggregate=True)
        save_checkpoint(
            directory,
            Checkpoint(round=server_round, payload=payload, num_examples=state.num_examples),
        )

    def global_vector(self, state: GlobalState | None) -> NDArray[np.float64]:
        """The current global adapter: the seeded initial one in round 1, else ``S / N``."""
        if state is None:
            return self.initial.copy()
        self.codec.validate(state.payload, aggregate=True)
        total = self.codec.decode(state.payload)
        return WeightedSum(total=total, num_examples=state.num_examples).mean()

    def train(self, state: GlobalState | None, *, server_round: int) -> TrainOutcome:
        """Train from the global adapter; return the encoded ``n_k w_k`` or a refusal.

        With DP on, the client first checks its own budget and declines a round that
        would take it over; after training it appends the round to its ledger. A
        retried round (already in the ledger) is not counted again: its seeds are
        fixed per (seed, round, client), so it reproduces the same release.
        """
        start = self.global_vector(state)
        seed = self.round_seed(server_round)
        if self.cfg.privacy.enabled:
            refusal = self._budget_refusal(server_round)
            if refusal:
                return TrainOutcome(payload=None, num_examples=0, result=None, declined=refusal)
        fmodel.set_adapter_vector(self.model, start)
        # Dropout draws from torch's global RNG: seed it too, so a round is reproducible.
        with fmodel.seeded(seed):
            if self.cfg.privacy.dp == "example":
                result = self._train_dpsgd(seed)
            else:
                result = train_local(
                    self.model,
                    self._loader(seed),
                    self.cfg.train,
                    device=self.device,
                    loss_fn=self.loss_fn,
                )
        trained = fmodel.get_adapter_vector(self.model)
        n = self.num_train_examples
        if self.cfg.privacy.dp == "client":
            trained, n = self._privatise_update(start, trained, seed), 1
        epsilon = self._record(server_round) if self.cfg.privacy.enabled else None
        payload = self.codec.encode(prescale(trained, n))
        return TrainOutcome(payload=payload, num_examples=n, result=result, epsilon=epsilon)

    def round_seed(self, server_round: int) -> int:
        """Sampling and noise seed of one round (node-secret keyed on a deployed node)."""
        if self.state_dir is None:  # simulation: reproducible from the run seed
            return round_seed(self.cfg.federation.seed, server_round, self.partition_id)
        return node_round_seed(
            load_node_secret(self.state_dir), self.cfg.federation.seed, server_round, self.name
        )

    def _loader(self, seed: int):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(seed)
        return make_loader(
            self.train_set, batch_size=self.cfg.train.batch_size, shuffle=True, generator=generator
        )

    def _budget_refusal(self, server_round: int) -> str:
        from fedtune.privacy import check_budget  # noqa: PLC0415

        p, plan, ledger = self.cfg.privacy, self.plan, self.ledger()
        done = any(
            r.run_id == self.run_id and r.round == server_round and r.client == self.name
            for r in ledger.records()
        )
        if done:
            return ""
        check = check_budget(
            ledger.history(client=self.name, level=plan.level),
            budget_epsilon=p.budget,
            delta=p.target_delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            accountant=p.accountant,
        )
        if not check.would_exceed:
            return ""
        return (
            f"privacy budget: round {server_round} would take epsilon from "
            f"{check.spent_epsilon:.3f} to {check.epsilon_after:.3f}, over the budget "
            f"{p.budget:g} (delta {p.target_delta:g})"
        )

    def _train_dpsgd(self, seed: int) -> TrainResult:
        from fedtune.privacy import make_dp_training  # noqa: PLC0415
        from fedtune.train import make_optimizer  # noqa: PLC0415

        cfg, plan = self.cfg, self.plan
        optimizer = make_optimizer(self.model, cfg.train)
        self.model.train()
        dp = make_dp_training(
            module=self.model,
            optimizer=optimizer,
            data=self.train_set,  # type: ignore[arg-type]  # a map-style Dataset
            expected_batch_size=cfg.train.batch_size,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,
            generator=torch.Generator().manual_seed(seed),
            noise_generator=torch.Generator(device=self.device).manual_seed(seed + 1),
            collate_fn=self.train_set.collate_fn(),
        )
        try:
            with warnings.catch_warnings():
                # The first LoRA layer's inputs come from frozen layers; Opacus' hooks are fine.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return train_local(
                    dp.module,
                    dp.data_loader,
                    cfg.train,
                    device=self.device,
                    optimizer=dp.optimizer,
                    loss_fn=self.loss_fn,
                )
        finally:
            self.model = dp.close()

    def _privatise_update(
        self, start: NDArray[np.float64], trained: NDArray[np.float64], seed: int
    ) -> NDArray[np.float64]:
        """Client-level DP: clip the update to C, add this client's share of the noise."""
        from fedtune.privacy import clip_update, distributed_noise  # noqa: PLC0415

        clip = self.cfg.privacy.max_grad_norm
        clipped = clip_update(trained - start, clip_norm=clip).clipped
        noise = distributed_noise(
            clipped.shape,
            noise_multiplier=self.plan.noise_multiplier,
            clip_norm=clip,
            num_sampled_clients=self.plan.sampled_clients,
            generator=np.random.default_rng(seed),
        )
        return start + clipped + noise

    def _record(self, server_round: int) -> float:
        p, plan = self.cfg.privacy, self.plan
        record = self.ledger().record(
            run_id=self.run_id,
            round=server_round,
            client=self.name,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            max_grad_norm=p.max_grad_norm,
            delta=p.target_delta,
            accountant=p.accountant,
            level=plan.level,
        )
        return float(record.epsilon)

    def evaluate(self, state: GlobalState | None) -> EvalResult:
        """Held-out loss and accuracy of the global adapter on this client's test split."""
        fmodel.set_adapter_vector(self.model, self.global_vector(state))
        loader = make_loader(self.test_set, batch_size=64, shuffle=False)
        if self.cfg.model.task == "causal-lm":
            from fedtune.lm_train import evaluate_lm  # noqa: PLC0415

            return evaluate_lm(self.model, loader, device=self.device)
        return evaluate(self.model, loader, device=self.device)
