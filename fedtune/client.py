"""One client's work, independent of Flower: decode the global adapter, train, encode.

:class:`ClientRuntime` holds what a client keeps between rounds in one process:
its data partition (tokenised), the model with its LoRA adapter, the adapter's
seeded initial value and its codec. ``clients/app.py`` turns Flower messages into
calls on it.
"""

from __future__ import annotations

import hashlib
import logging
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
from fedtune.privacy.accounting import Relation
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

log = logging.getLogger("fedtune.client")


@dataclass(frozen=True)
class GlobalState:
    """The aggregate a client receives: a payload of ``sum n_k w_k`` and ``sum n_k``."""

    payload: WirePayload
    num_examples: int


@dataclass(frozen=True)
class TrainOutcome:
    """What a client sends back after training, or why it declined.

    ``result`` is the local training's statistics: never sent by a DP client, and
    ``None`` for a declined round or a replayed reply (``replayed``: a retried round
    answered with the reply already sent, nothing new released).
    """

    payload: WirePayload | None
    num_examples: int
    result: TrainResult | None
    epsilon: float | None = None
    declined: str = ""
    replayed: bool = False


@dataclass(frozen=True)
class PrivacyPlan:
    """One round's DP parameters, fixed for the whole run (checked before training)."""

    level: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    sampled_clients: int
    tolerance: int


def sampled_clients(cfg: RunConfig) -> int:
    """How many clients the server samples per round with all clients connected."""
    return cfg.federation.sampled_per_round


def privacy_plan(cfg: RunConfig, *, num_train_examples: int) -> PrivacyPlan:
    """σ, q and steps per round; σ calibrated once for the planned rounds if not given.

    Example level: ``q = batch-size / n_k``, ``steps = local-epochs * int(1 / q)``
    (Opacus' Poisson epochs). Client level: ``q = 1`` and one step per round: the
    server picks the clients from a seed it knows, so sampling amplifies nothing
    against it. Both under the replace-one relation (``n_k`` is public).
    """
    from fedtune.privacy import calibrate_noise  # noqa: PLC0415

    p, fed = cfg.privacy, cfg.federation
    if p.dp == "example":
        q = min(1.0, cfg.train.batch_size / num_train_examples)
        steps = cfg.train.local_epochs * int(1 / q)
    else:
        q, steps = 1.0, 1
    sigma = p.noise_multiplier or calibrate_noise(
        target_epsilon=p.target_epsilon,
        target_delta=p.target_delta,
        sample_rate=q,
        steps=steps * fed.num_rounds,
        accountant=p.accountant,
        relation=RELATION,
    )
    return PrivacyPlan(
        level=p.dp,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        sampled_clients=sampled_clients(cfg),
        tolerance=p.client_dp_tolerance,
    )


#: The neighbouring relation of every fedtune release: the example count is public.
RELATION: Relation = "replace-one"


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed of its own for each (run seed, round, client): training without DP."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def release_seed(seed: int, run_nonce: str, input_digest: str) -> int:
    """``seeded-noise`` simulations only: a seed per release, never shared by two."""
    digest = hashlib.sha256(f"{seed}/{run_nonce}/{input_digest}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_codec(*, length: int, secret_context: Path | None = None) -> Codec:
    """The client's codec: plaintext, or CKKS with the secret context at ``secret_context``."""
    if secret_context is None:
        return PlainCodec(length=length)
    from fedtune import crypto  # noqa: PLC0415 - only needed with encryption
    from fedtune.wire import CkksCodec  # noqa: PLC0415

    return CkksCodec(crypto.load_context(secret_context), length=length)


def _checked_mean(mean: NDArray[np.float64]) -> NDArray[np.float64]:
    """``mean`` if every entry is finite and within the adapter value bound, else raise."""
    from fedtune.bounds import check_global_mean  # noqa: PLC0415

    check_global_mean(mean)
    return mean


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
        from fedtune.bounds import StepGuard  # noqa: PLC0415

        if state_dir is not None:
            guard_path: Path | None = state_dir / "step-guard.npz"
        else:
            guard_path = privacy_dir / f"{self.name}.step-guard.npz" if privacy_dir else None
        config_digest = hashlib.sha256(cfg.to_toml().encode()).hexdigest()[:16]
        self.step_guard = StepGuard(
            cfg.federation.max_step_factor, path=guard_path, run=f"{run_id}/{config_digest}"
        )
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
        from fedtune.run.checkpoint import (  # noqa: PLC0415
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

    def global_vector(self, state: GlobalState | None, *, server_round: int) -> NDArray[np.float64]:
        """The current global adapter: the seeded initial one in round 1, else ``S / N``.

        ``server_round`` is the round whose aggregate ``state`` is. A key holder
        checks what it decrypted before using it: every entry finite and within
        :data:`fedtune.bounds.VALUE_BOUND` (:func:`_checked_mean`), and a step from
        the last global it accepted within ``max-step-factor`` times the largest
        step before (:class:`fedtune.bounds.StepGuard`). Else a
        :class:`fedtune.bounds.BoundError` (a ``ValueError``), which the ClientApp
        turns into an error reply that the server drops with a log line.

        This limits what a forged or scaled update can do to the model; it does not
        stop a malicious key holder whose update stays within the bounds. The
        cryptographic answer, zero-knowledge norm proofs on each encrypted update
        (RoFL, ACORN), is not built.
        """
        if state is None:
            return self.initial.copy()
        self.codec.validate(state.payload, aggregate=True)
        total = self.codec.decode(state.payload)
        mean = _checked_mean(WeightedSum(total=total, num_examples=state.num_examples).mean())
        self.step_guard.check(mean, server_round=server_round)
        return mean

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
            canaries = self._canaries()
            with fmodel.seeded(seed):
                result = self._train_plain(
                    seed, canaries=canaries and canaries.step_source(server_round)
                )
            trained = fmodel.get_adapter_vector(self.model)
            self._score_canaries(canaries, server_round, trained - start)
            n = self.num_train_examples
            return TrainOutcome(
                payload=self.codec.encode(prescale(trained, n)), num_examples=n, result=result
            )
        return self._train_private(
            state, start, server_round=server_round, sampled_clients=sampled_clients
        )

    def _decline(self, reason: str) -> TrainOutcome:
        log.warning("%s declined a round: %s", self.name, reason)
        return TrainOutcome(payload=None, num_examples=0, result=None, declined=reason)

    def _train_private(
        self,
        state: GlobalState | None,
        start: NDArray[np.float64],
        *,
        server_round: int,
        sampled_clients: int,
    ) -> TrainOutcome:
        from fedtune.privacy.releases import (  # noqa: PLC0415
            StoredReply,
            input_hash,
            load_reply,
            run_nonce,
            store_reply,
        )

        assert self.privacy_dir is not None  # checked in __init__
        p, plan = self.cfg.privacy, self.plan
        nonce = run_nonce(
            self.privacy_dir, client=self.name, run_id=self.run_id, config=self.cfg.to_flat()
        )
        digest = input_hash(
            server_round=server_round,
            payload=None if state is None else state.payload,
            num_examples=0 if state is None else state.num_examples,
            sampled_clients=sampled_clients,
        )
        ledger = self.ledger()
        released = ledger.release(run_nonce=nonce, round=server_round, client=self.name)
        if released is not None:
            if released.input_hash != digest:
                return self._decline(
                    f"round {server_round} of this run was already released from another "
                    "global state; a second release of one round is refused"
                )
            stored = load_reply(self.privacy_dir, client=self.name)
            if stored is None or (stored.run_nonce, stored.round, stored.input_hash) != (
                nonce,
                server_round,
                digest,
            ):
                return self._decline(
                    f"round {server_round} was already released and its reply is no longer "
                    "stored; it is not trained again"
                )
            log.info("%s replays its reply to round %d (same input)", self.name, server_round)
            return TrainOutcome(
                payload=stored.payload,
                num_examples=stored.num_examples,
                result=None,
                epsilon=stored.epsilon,
                replayed=True,
            )
        m = sampled_clients
        if plan.level == "client" and not plan.tolerance < m <= plan.sampled_clients:
            return self._decline(
                f"client-level DP: the server says {m} client(s) train this round; the "
                f"noise shares need between {plan.tolerance + 1} and the planned "
                f"{plan.sampled_clients} (`client-dp-tolerance` = {plan.tolerance})"
            )
        refusal = self._budget_refusal(server_round, ledger)
        if refusal:
            return self._decline(refusal)
        noise = self._noise_source(nonce, digest)
        fmodel.set_adapter_vector(self.model, start)
        seed = (
            secrets.randbits(63)
            if not p.seeded_noise
            else release_seed(self.cfg.federation.seed, nonce, digest)
        )
        canaries = self._canaries()
        with fmodel.seeded(seed):
            if plan.level == "example":
                result, used = self._train_dpsgd(
                    seed, noise, canaries=canaries and canaries.step_source(server_round)
                )
            else:
                result, used = self._train_plain(seed), plan
        trained = fmodel.get_adapter_vector(self.model)
        canary_update = trained - start  # scored once the release is recorded and stored
        n = self.num_train_examples
        if plan.level == "client":
            trained, n = self._privatise_update(start, trained, noise, sampled=m), 1
        record = ledger.record(
            run_id=self.run_id,
            run_nonce=nonce,
            input_hash=digest,
            round=server_round,
            client=self.name,
            noise_multiplier=used.noise_multiplier,
            sample_rate=used.sample_rate,
            steps=used.steps,
            max_grad_norm=p.max_grad_norm,
            delta=p.target_delta,
            accountant=p.accountant,
            relation=RELATION,
            level=plan.level,
            noise="seeded" if p.seeded_noise else "csprng",
            batch_size=self.cfg.train.batch_size if plan.level == "example" else 0,
            local_epochs=self.cfg.train.local_epochs if plan.level == "example" else 0,
            num_examples=self.num_train_examples,
            sampled_clients=m if plan.level == "client" else 0,
            tolerance=plan.tolerance if plan.level == "client" else 0,
        )
        payload = self.codec.encode(prescale(trained, n))
        epsilon = float(record.epsilon)
        store_reply(
            self.privacy_dir,
            client=self.name,
            reply=StoredReply(
                run_nonce=nonce,
                round=server_round,
                input_hash=digest,
                payload=payload,
                num_examples=n,
                epsilon=epsilon,
            ),
        )
        self._score_canaries(canaries, server_round, canary_update)
        return TrainOutcome(payload=payload, num_examples=n, result=result, epsilon=epsilon)

    def _noise_source(self, nonce: str, digest: str):  # type: ignore[no-untyped-def]
        from fedtune.privacy.noise import CsprngNoise, SeededNoise  # noqa: PLC0415

        if self.cfg.privacy.seeded_noise:
            return SeededNoise(release_seed(self.cfg.federation.seed, nonce, digest))
        return CsprngNoise()

    def _canaries(self):  # type: ignore[no-untyped-def]
        """This client's audit canaries (``audit-canaries``), or None."""
        m = self.cfg.privacy.audit_canaries
        if not m:
            return None
        from fedtune.privacy.canaries import CanaryState, canary_file, load_canaries  # noqa: PLC0415

        assert self.privacy_dir is not None  # a simulation always has one
        path = canary_file(self.privacy_dir, self.name)
        if path.is_file():
            return load_canaries(path)
        seed = round_seed(self.cfg.federation.seed, 0, self.partition_id)
        return CanaryState.create(
            m=m,
            num_coords=self.initial.size,
            clip_norm=self.cfg.privacy.max_grad_norm,
            seed=seed,
        )

    def _score_canaries(self, canaries, server_round: int, update: NDArray[np.float64]) -> None:  # type: ignore[no-untyped-def]
        if canaries is None:
            return
        from fedtune.privacy.canaries import canary_file  # noqa: PLC0415

        assert self.privacy_dir is not None
        canaries.add_release(server_round, update)
        canaries.save(canary_file(self.privacy_dir, self.name))

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
            from fedtune.train import make_optimizer  # noqa: PLC0415

            optimizer = make_optimizer(self.model, self.cfg.train)
            params = [p for p in self.model.parameters() if p.requires_grad]
            rate = min(1.0, batch_size / max(1, self.num_train_examples))

            def add_canaries(*_: object) -> None:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                canaries.add(grads, sample_rate=rate, scale=1.0 / batch_size)

            optimizer.register_step_pre_hook(add_canaries)
        return train_local(
            self.model,
            loader,
            self.cfg.train,
            device=self.device,
            loss_fn=self.loss_fn,
            optimizer=optimizer,
        )

    def _budget_refusal(self, server_round: int, ledger: PrivacyLedger) -> str:
        from fedtune.privacy import check_budget  # noqa: PLC0415

        p, plan = self.cfg.privacy, self.plan
        check = check_budget(
            ledger.history(client=self.name, level=plan.level),
            budget_epsilon=p.budget,
            delta=p.target_delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            accountant=p.accountant,
            relation=RELATION,
        )
        if not check.would_exceed:
            return ""
        return (
            f"privacy budget: round {server_round} would take epsilon from "
            f"{check.spent_epsilon:.3f} to {check.epsilon_after:.3f}, over the budget "
            f"{p.budget:g} (delta {p.target_delta:g})"
        )

    def _train_dpsgd(self, seed: int, noise, canaries=None) -> tuple[TrainResult, PrivacyPlan]:  # type: ignore[no-untyped-def]
        """One round of DP-SGD; returns the result and σ, q, steps as Opacus ran them."""
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
            noise=noise,
            collate_fn=self.train_set.collate_fn(),
            canaries=canaries,
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

    def _privatise_update(
        self,
        start: NDArray[np.float64],
        trained: NDArray[np.float64],
        noise,  # type: ignore[no-untyped-def]
        *,
        sampled: int,
    ) -> NDArray[np.float64]:
        """Client-level DP: clip the update to C, add this client's share of the noise."""
        from fedtune.privacy import clip_update, distributed_noise  # noqa: PLC0415

        clip = self.cfg.privacy.max_grad_norm
        clipped = clip_update(trained - start, clip_norm=clip).clipped
        share = distributed_noise(
            clipped.shape,
            noise_multiplier=self.plan.noise_multiplier,
            clip_norm=clip,
            num_sampled_clients=sampled,
            tolerance=self.plan.tolerance,
            noise=noise,
        )
        return start + clipped + share

    def evaluate(self, state: GlobalState | None, *, server_round: int) -> EvalResult:
        """Held-out loss and accuracy of round ``server_round``'s global adapter (test split)."""
        start = self.global_vector(state, server_round=server_round)
        fmodel.set_adapter_vector(self.model, start)
        loader = make_loader(self.test_set, batch_size=64, shuffle=False)
        if self.cfg.model.task == "causal-lm":
            from fedtune.lm_train import evaluate_lm  # noqa: PLC0415

            return evaluate_lm(self.model, loader, device=self.device)
        return evaluate(self.model, loader, device=self.device)
