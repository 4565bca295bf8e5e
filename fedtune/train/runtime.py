"""One client's work, independent of Flower: decode the global adapter, train, encode.

:class:`ClientRuntime` holds what a client keeps between rounds in one process:
its name and partition, its privacy plan, ledger and step guard. What every
client of a worker process shares lives in :mod:`fedtune.train.shared`: the base
model with its LoRA adapter (a client sets its adapter vector in, trains, reads
it back), the tokenizer, the codec, and a bounded LRU of tokenised partitions
(rebuilt deterministically when evicted). ``fedtune/apps/client/app.py`` turns Flower messages
into calls on it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray

from fedtune import model as fmodel
from fedtune.aggregation import WeightedSum, prescale
from fedtune.config import RunConfig
from fedtune.data.memo import data_key
from fedtune.errors import CheckpointError
from fedtune.guard import MovementGuard, node_guard, payload_digest
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.dpsgd import make_dp_training
from fedtune.privacy.policy import NodePolicy
from fedtune.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.tasks import get_task
from fedtune.tasks.base import ClientDatasets
from fedtune.train.eval_release import evaluate_release
from fedtune.train.held_out import check_held_out
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
from fedtune.train.plan import PrivacyPlan, privacy_plan
from fedtune.train.release import client_canaries, score_canaries, train_private
from fedtune.train.seeds import round_seed
from fedtune.train.shared import SharedModel, release_model, worker_cache
from fedtune.train.state import GlobalState, TrainOutcome

if TYPE_CHECKING:
    from fedtune.train.eval_release import EvalOutcome

__all__ = ["ClientRuntime", "GlobalState", "TrainOutcome"]

log = logging.getLogger("fedtune.client")


class ClientRuntime:
    """A client's own state; the model, tokenizer, codec and data are the worker's.

    Built on a client's first message in a process. Its partition is tokenised
    then (for the sizes and label names kept here) and again only after the
    worker's partition LRU (``partition-cache-size``) evicted it.
    """

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
        policy: NodePolicy | None = None,
    ) -> None:
        self.cfg = cfg
        #: The node's own privacy policy (a simulated client's is filled from ``cfg``;
        #: a deployed node's always comes from :func:`fedtune.node.round.runtime_for`).
        self.policy = policy if policy is not None else NodePolicy.from_run_config(cfg)
        #: The run config as this node's data sees it: its own held-out fraction.
        self._data_cfg = replace(
            cfg, data=replace(cfg.data, test_fraction=self.policy.test_fraction)
        )
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.name = name or f"client-{partition_id}"
        self.run_id = run_id
        self.privacy_dir = privacy_dir
        self.state_dir = state_dir
        self.device = select_device(cfg.train.device)
        self.task = get_task(cfg.model.task)
        cache = worker_cache()
        cache.partitions.resize(cfg.federation.partition_cache_size)
        sets = self.datasets
        self.label_names = list(sets.label_names)
        if state_dir is not None:  # a node: its held-out rows are never trained on later
            check_held_out(state_dir, test_set=sets.test_set, train_set=sets.train_set)
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
        self._plan: PrivacyPlan | None = None
        self._guard: MovementGuard | None = None
        self._decoded: tuple[tuple[int, int, str], NDArray[np.float64]] | None = None
        if cfg.privacy.enabled and privacy_dir is None:
            raise ValueError("DP is on but the client has no directory for its privacy ledger.")

    @property
    def datasets(self) -> ClientDatasets:
        """This client's tokenised partition, from the worker's LRU (rebuilt if evicted)."""
        cfg = self._data_cfg
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
    def plan(self) -> PrivacyPlan:
        """This client's DP parameters (calibrated on first use)."""
        if self._plan is None:
            dp_eval = self.policy.evaluation == "dp"
            self._plan = privacy_plan(
                self.cfg,
                num_train_examples=self.num_train_examples,
                eval_noise_multiplier=self.policy.eval_noise_multiplier if dp_eval else None,
                delta=self.policy.delta,
            )
        return self._plan

    def ledger(self) -> PrivacyLedger:
        """This client's append-only privacy ledger."""
        if self.privacy_dir is None:
            raise ValueError("This client has no privacy directory (DP is off).")
        return PrivacyLedger(self.privacy_dir / f"{self.name}.jsonl")

    @property
    def num_train_examples(self) -> int:
        """Examples this client trains on each epoch."""
        return self._num_train

    def keep_global(self, state: GlobalState | None, *, server_round: int) -> None:
        """On a node, keep the newest global sum in ``STATE_DIR/checkpoint``.

        With the resolved ``STATE_DIR/config.toml`` beside it, ``fedtune export
        STATE_DIR --key SECRET`` writes the PEFT adapter on the node itself, from the
        same files a server checkpoint has (the server cannot: it holds no key). Only a
        global the movement guard accepted is kept (a refused one is logged, locally).
        """
        if self.state_dir is None or state is None:
            return

        directory = self.state_dir / "checkpoint"
        try:
            if load_checkpoint(directory).round >= server_round:
                return
        except CheckpointError:
            pass
        self.global_vector(state, server_round=server_round)
        if self.guard.last_accepted()[0] != server_round:
            log.warning("%s: round %d's global was refused; not kept.", self.name, server_round)
            return
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

    @property
    def guard(self) -> MovementGuard:
        """The key holder's movement guard (:mod:`fedtune.guard`), built on first use.

        Its bound is :func:`fedtune.movement.round_bound` of this run's config and this
        node's data, times the node policy's ``max-step-slack``; ``max-step-factor`` in
        the run config has no say. Its signed state lives in ``STATE_DIR`` on a node,
        in the privacy directory in simulation, else in memory.
        """
        if self._guard is None:
            self._guard = node_guard(self, directory=self.state_dir or self.privacy_dir)
            log.info("%s: movement bound %.4g per round", self.name, self._guard.bound)
        return self._guard

    def global_vector(self, state: GlobalState | None, *, server_round: int) -> NDArray[np.float64]:
        """The current global adapter: the seeded initial one in round 1, else ``S / N``.

        ``server_round`` is the round whose aggregate ``state`` is. A key holder
        checks what it decrypted before using it (:meth:`guard`): every entry finite
        and within :data:`fedtune.bounds.VALUE_BOUND`, and its largest coordinate
        within the configuration's movement bound of the last global it accepted.
        A refused global is not used and not reported: this returns the last
        accepted global instead and the node answers as usual (a refusal the server
        could see would tell it about the decrypted values; :mod:`fedtune.guard`).

        This limits what a forged or scaled update can do to the model; it does not
        stop a malicious key holder whose update stays within the bounds. The
        cryptographic answer, zero-knowledge norm proofs on each encrypted update
        (RoFL, ACORN), is not built.
        """
        if state is None:
            return self.initial.copy()
        self.codec.validate(state.payload, aggregate=True)
        key = (server_round, state.num_examples, payload_digest(state.payload))
        if self._decoded is not None and self._decoded[0] == key:
            return self._decoded[1].copy()  # one decryption per message, not three
        total = self.codec.decode(state.payload)
        mean = WeightedSum(total=total, num_examples=state.num_examples).mean()
        used = self.guard.accept(mean, server_round=server_round)
        self._decoded = (key, used.copy())
        return used

    def train(
        self, state: GlobalState | None, *, server_round: int, sampled_clients: int = 0
    ) -> TrainOutcome:
        """Train from the global adapter; return the encoded ``n_k w_k`` or a refusal.

        With DP on, a round is a *release* keyed by this client's own run nonce and a
        hash of what the server sent (:mod:`fedtune.privacy.releases`): a retry with
        the same input gets the stored reply verbatim, another input for a released
        round is refused, and a new release is budget-checked first and appended to
        the ledger before its reply leaves. ``sampled_clients`` is the server's count
        of clients trained this round (client-level DP sizes its noise share from it).
        """
        start = self.global_vector(state, server_round=server_round - 1)

        if not self.cfg.privacy.enabled:
            seed = round_seed(self.cfg.federation.seed, server_round, self.partition_id)
            fmodel.set_adapter_vector(self.model, start)
            canaries = client_canaries(self)
            with fmodel.seeded(seed):
                result = self._train_plain(
                    seed, canaries=canaries and canaries.step_source(server_round)
                )
            trained = fmodel.get_adapter_vector(self.model)
            score_canaries(self, canaries, server_round, trained - start)
            n = self.num_train_examples
            return TrainOutcome(
                payload=self.codec.encode(prescale(trained, n)), num_examples=n, result=result
            )
        return train_private(
            self, state, start, server_round=server_round, sampled_clients=sampled_clients
        )

    def _train_plain(self, seed: int, canaries=None) -> TrainResult:  # type: ignore[no-untyped-def]
        """Local training without DP-SGD (no DP, or client-level DP before clipping).

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

    def _train_dpsgd(self, seed: int, noise, canaries=None) -> tuple[TrainResult, PrivacyPlan]:  # type: ignore[no-untyped-def]
        """One round of DP-SGD; returns the result and σ, q, steps as Opacus ran them."""
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
            noise=noise,
            grid=cfg.privacy.dp_noise == "grid",
            collate_fn=self.train_set.collate_fn(),
            canaries=canaries,
            physical_batch_size=cfg.train.physical_batch_size,
        )
        try:
            with warnings.catch_warnings():
                # The first LoRA layer's inputs come from frozen layers; Opacus' hooks are fine.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                result = train_local(
                    dp.module,
                    dp.data_loader,
                    cfg.train,
                    device=self.device,
                    optimizer=dp.optimizer,
                    loss_fn=self.loss_fn,
                    private=True,
                )
        finally:
            self.model = dp.close()
            release_model(self.model)  # the next client of this worker starts clean
        used = replace(
            plan,
            noise_multiplier=float(dp.optimizer.noise_multiplier),  # type: ignore[attr-defined]
            sample_rate=float(dp.sample_rate),
            steps=int(result.steps),
        )
        if (used.noise_multiplier, used.sample_rate, used.steps) != (
            plan.noise_multiplier,
            plan.sample_rate,
            plan.steps,
        ):
            # The ledger records what ran; a mismatch means the budget check was wrong.
            raise RuntimeError(
                f"DP-SGD ran sigma={used.noise_multiplier}, q={used.sample_rate}, "
                f"steps={used.steps}, but the budget was checked for sigma="
                f"{plan.noise_multiplier}, q={plan.sample_rate}, steps={plan.steps}."
            )
        return result, used

    def evaluate(self, state: GlobalState | None, *, server_round: int) -> EvalResult:
        """Exact held-out metrics of round ``server_round``'s global adapter, for the node.

        What a node may *send* is :meth:`evaluation`: with DP on, a noised and
        accounted release unless the node's policy opts out.
        """
        start = self.global_vector(state, server_round=server_round)
        fmodel.set_adapter_vector(self.model, start)
        loader = make_loader(self.test_set, batch_size=64, shuffle=False, by_length=True)
        return self.task.evaluate(self.model, loader, device=self.device, cfg=self.cfg)

    def evaluation(self, state: GlobalState | None, *, server_round: int) -> EvalOutcome:
        """The held-out metrics this node sends for round ``server_round``'s global state.

        Exact with DP off; with DP on a release (:mod:`fedtune.train.eval_release`):
        noised, budget-checked, recorded in the ledger and replayed for the same state,
        or exact and recorded as unaccounted when ``policy.evaluation == "exact"``.
        """
        return evaluate_release(self, state, server_round=server_round)
