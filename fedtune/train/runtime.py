"""One client's round above the plain trainer: what it may use, what it may release.

:class:`ClientRuntime` is the object :mod:`fedtune.node.round` calls for every server
message. Below it, :class:`fedtune.train.trainer.Trainer` trains and scores in the
clear (the worker's shared model, this client's partition). This class adds what a
*release* needs, and reads from setup to reply:

1. setup: the node's policy, its privacy plan (σ, q, steps), its ledger and release
   keys (:mod:`fedtune.train.keys`), its audit canaries;
2. :meth:`ClientRuntime.global_vector`: the global sum decrypted, checked by the
   movement guard (:mod:`fedtune.guard`), and kept on a node (:meth:`keep_global`);
3. :meth:`ClientRuntime.train`: without DP, one plain round; with DP a release keyed
   by the run nonce and a hash of the input, replayed, refused (level, budget) or
   trained at its DP level (:mod:`fedtune.train.levels`), recorded in the ledger and
   stored before its reply leaves; canaries are scored last;
4. :meth:`ClientRuntime.evaluation`: exact held-out metrics, or an evaluation release
   (:mod:`fedtune.train.eval_release`).

``fedtune/apps/client/app.py`` and the node worker turn Flower messages into these calls.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedtune import model as fmodel
from fedtune.aggregation import WeightedSum, prescale
from fedtune.config import RunConfig
from fedtune.errors import CheckpointError
from fedtune.guard import MovementGuard, node_guard, payload_digest
from fedtune.node.codes import CODES
from fedtune.privacy import PrivacyLedger, check_budget
from fedtune.privacy.canaries import CanaryState, canary_file, load_canaries
from fedtune.privacy.policy import NodePolicy
from fedtune.privacy.releases import StoredReply, load_reply, store_reply
from fedtune.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.train.eval_release import EvalOutcome, evaluate_release, exact
from fedtune.train.held_out import check_held_out
from fedtune.train.keys import ReleaseKeys
from fedtune.train.levels import dp_level
from fedtune.train.loop import (
    EvalResult,
)
from fedtune.train.plan import RELATION, PrivacyPlan, privacy_plan
from fedtune.train.seeds import round_seed
from fedtune.train.state import GlobalState, TrainOutcome
from fedtune.train.trainer import Trainer

__all__ = ["ClientRuntime", "GlobalState", "TrainOutcome"]

log = logging.getLogger("fedtune.client")


class ClientRuntime(Trainer):
    """A client's own state and round; the model, tokenizer, codec and data are the worker's.

    Built on a client's first message in a process (:func:`fedtune.node.round.runtime_for`).
    ``policy`` is the node's own privacy policy (a simulated client's is filled from
    ``cfg``); ``privacy_dir`` holds the ledger, release keys and stored replies (needed
    with DP on); ``state_dir`` is a node's own directory.
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
        self.policy = policy if policy is not None else NodePolicy.from_run_config(cfg)
        if secret_context is not None and Path(secret_context).is_dir():
            # multiparty CKKS in simulation: the driver's key directory, one file a party
            secret_context = Path(secret_context) / f"{name or f'client-{partition_id}'}.party"
        super().__init__(
            cfg,
            partition_id=partition_id,
            num_partitions=num_partitions,
            test_fraction=self.policy.test_fraction,
            secret_context=secret_context,
        )
        self.name = name or f"client-{partition_id}"
        self.run_id = run_id
        self.privacy_dir = privacy_dir
        self.state_dir = state_dir
        if state_dir is not None:  # a node: its held-out rows are never trained on later
            sets = self.datasets
            check_held_out(state_dir, test_set=sets.test_set, train_set=sets.train_set)
        if cfg.privacy.enabled and privacy_dir is None:
            raise ValueError("DP is on but the client has no directory for its privacy ledger.")
        self.keys: ReleaseKeys | None = None
        if privacy_dir is not None:
            self.keys = ReleaseKeys(
                privacy_dir=privacy_dir,
                client=self.name,
                run_id=run_id,
                config=cfg.to_flat(),
                seed=cfg.federation.seed,
                seeded_noise=cfg.privacy.seeded_noise,
            )
        self._plan: PrivacyPlan | None = None
        self._guard: MovementGuard | None = None
        self._decoded: tuple[tuple[int, int, str], NDArray[np.float64]] | None = None

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
    def guard(self) -> MovementGuard:
        """The key holder's movement guard (:mod:`fedtune.guard`), built on first use.

        Its bound is :func:`fedtune.movement.round_bound` of this run's config and this
        node's data, times the node policy's ``max-step-slack``. Its signed state lives
        in ``STATE_DIR`` on a node, in the privacy directory in simulation, else in memory.
        """
        if self._guard is None:
            self._guard = node_guard(self, directory=self.state_dir or self.privacy_dir)
            log.info("%s: movement bound %.4g per round", self.name, self._guard.bound)
        return self._guard

    def global_vector(self, state: GlobalState | None, *, server_round: int) -> NDArray[np.float64]:
        """The current global adapter: the seeded initial one in round 1, else ``S / N``.

        ``server_round`` is the round whose aggregate ``state`` is. A key holder checks
        what it decrypted (:meth:`guard`): every entry finite and within
        :data:`fedtune.bounds.VALUE_BOUND`, its largest coordinate within the movement
        bound of the last global it accepted. A refused global is not used and not
        reported: the last accepted one is returned and the node answers as usual (a
        refusal the server could see would tell it about the decrypted values). This
        does not stop a malicious key holder whose update stays within the bounds;
        zero-knowledge norm proofs on each update (RoFL, ACORN) would, and are not built.
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

    def keep_global(self, state: GlobalState | None, *, server_round: int) -> None:
        """On a node, keep the newest accepted global sum in ``STATE_DIR/checkpoint``.

        With the resolved ``STATE_DIR/config.toml`` beside it, ``fedtune export
        STATE_DIR --key SECRET`` writes the PEFT adapter on the node itself (the server
        cannot: it holds no key). A global the movement guard refused is not kept.
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
        labels = ",".join(self.label_names)
        config = replace(self.cfg, data=replace(self.cfg.data, label_names=labels))
        (self.state_dir / "config.toml").write_text(config.to_toml())
        payload = self.codec.validate(state.payload, aggregate=True)
        save_checkpoint(
            directory,
            Checkpoint(round=server_round, payload=payload, num_examples=state.num_examples),
        )

    def train(
        self, state: GlobalState | None, *, server_round: int, sampled_clients: int = 0
    ) -> TrainOutcome:
        """Train from the global adapter; return the encoded ``n_k w_k`` or a refusal.

        With DP on, a round is a *release* (:mod:`fedtune.privacy.releases`): a retry
        with the same input gets the stored reply verbatim, another input for a
        released round is refused, and a new release is refused by its level or the
        budget, or trained, appended to the ledger and stored before its reply leaves.
        ``sampled_clients`` is the server's count of clients trained this round
        (client-level DP sizes its noise share from it).
        """
        start = self.global_vector(state, server_round=server_round - 1)
        if self.keys is None or not self.cfg.privacy.enabled:  # no DP: one plain round
            seed = round_seed(self.cfg.federation.seed, server_round, self.partition_id)
            fmodel.set_adapter_vector(self.model, start)
            canaries = self._canaries()
            with fmodel.seeded(seed):
                result = self.fit(seed, canaries=canaries and canaries.step_source(server_round))
            trained = fmodel.get_adapter_vector(self.model)
            self._score_canaries(canaries, server_round, trained - start)
            n = self.num_train_examples
            payload = self.codec.encode(prescale(trained, n))
            return TrainOutcome(payload=payload, num_examples=n, result=result)
        # 1. Key the release: this run's nonce and what the server asked.
        p, plan, keys, ledger = self.cfg.privacy, self.plan, self.keys, self.ledger()
        nonce = keys.nonce()
        digest = keys.train_input(state, server_round=server_round, sampled_clients=sampled_clients)
        # 2. A round already released: replay the same input's reply, refuse another.
        released = ledger.release(run_nonce=nonce, round=server_round, client=self.name)
        if released is not None:
            return self._replay(released.input_hash, nonce, digest, server_round)
        # 3. Refuse what the level or the node's budget does not allow.
        level = dp_level(plan.level)
        if refusal := level.refusal(plan, sampled_clients=sampled_clients):
            return self._decline("dp-level-refused", refusal)
        if refusal := self._budget_refusal(server_round, ledger):
            return self._decline("budget-spent", refusal)
        # 4. Train at the level, with this release's noise; transform what leaves.
        noise = keys.noise(nonce, digest)
        fmodel.set_adapter_vector(self.model, start)
        seed = keys.release_seed(nonce, digest) if p.seeded_noise else secrets.randbits(63)
        canaries = self._canaries()
        with fmodel.seeded(seed):
            steps = canaries and canaries.step_source(server_round)
            result, used = level.train(self, plan, seed, noise, steps)
        trained = fmodel.get_adapter_vector(self.model)
        out = level.transform(
            start, trained, trainer=self, plan=plan, noise=noise, sampled_clients=sampled_clients
        )
        # 5. Record the release in the ledger, store the reply, then score canaries.
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
            delta=self.policy.delta,  # the node's δ, never the server's
            accountant=p.accountant,
            relation=RELATION,
            level=plan.level,
            noise="seeded" if p.seeded_noise else "csprng",
            mechanism=p.mechanism,
            num_examples=self.num_train_examples,
            **level.ledger_fields(self, plan, sampled_clients=sampled_clients),
        )
        n, epsilon = out.num_examples, float(record.epsilon)
        payload = self.codec.encode(prescale(out.vector, n))
        reply = StoredReply(nonce, server_round, digest, payload, n, epsilon)
        store_reply(keys.privacy_dir, client=self.name, reply=reply)
        self._score_canaries(canaries, server_round, trained - start)
        return TrainOutcome(payload=payload, num_examples=n, result=result, epsilon=epsilon)

    def evaluate(self, state: GlobalState | None, *, server_round: int) -> EvalResult:
        """Exact held-out metrics of round ``server_round``'s global adapter, for the node.

        What a node may *send* is :meth:`evaluation`.
        """
        return self.score(self.global_vector(state, server_round=server_round))

    def evaluation(self, state: GlobalState | None, *, server_round: int) -> EvalOutcome:
        """The held-out metrics this node sends for round ``server_round``'s global state.

        Exact with DP off; with DP on a release (:mod:`fedtune.train.eval_release`):
        noised, budget-checked, recorded and replayed for the same state, or exact and
        recorded as unaccounted when the node's policy says ``evaluation = "exact"``.
        """
        vector = self.global_vector(state, server_round=server_round)
        if self.keys is None or not self.cfg.privacy.enabled:
            return exact(self, vector)
        return evaluate_release(
            self,
            vector,
            state,
            server_round=server_round,
            keys=self.keys,
            ledger=self.ledger(),
            policy=self.policy,
        )

    # -- the steps of a private round -------------------------------------------------

    def _decline(self, code: str, detail: str) -> TrainOutcome:
        """Decline the round: ``code`` (a fixed :data:`fedtune.node.codes.CODES` entry) is
        sent; ``detail``, with its numbers, goes to this node's own log only."""
        if code not in CODES:
            raise ValueError(f"decline code {code!r} is not one of {sorted(CODES)}.")
        log.warning("%s declined a round (%s): %s", self.name, code, detail)
        return TrainOutcome(payload=None, num_examples=0, result=None, declined=code)

    def _replay(self, released: str, nonce: str, digest: str, server_round: int) -> TrainOutcome:
        """A released round asked again: its stored reply for the same input, else refused."""
        if released != digest:
            return self._decline(
                "round-already-released",
                f"round {server_round} of this run was already released from another "
                "global state; a second release of one round is refused",
            )
        assert self.privacy_dir is not None  # a DP client always has one
        stored = load_reply(self.privacy_dir, client=self.name)
        if stored is None or (stored.run_nonce, stored.round, stored.input_hash) != (
            nonce,
            server_round,
            digest,
        ):
            return self._decline(
                "reply-not-stored",
                f"round {server_round} was already released and its reply is no longer "
                "stored; it is not trained again",
            )
        log.info("%s replays its reply to round %d (same input)", self.name, server_round)
        return TrainOutcome(
            payload=stored.payload,
            num_examples=stored.num_examples,
            result=None,
            epsilon=stored.epsilon,
            replayed=True,
        )

    def _budget_refusal(self, server_round: int, ledger: PrivacyLedger) -> str:
        """Why the node's own budget and δ (its policy, never the run config's) refuse."""
        plan, policy = self.plan, self.policy
        check = check_budget(
            ledger.history(client=self.name, level=plan.level),
            budget_epsilon=policy.epsilon_budget,
            delta=policy.delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            accountant=self.cfg.privacy.accountant,
            relation=RELATION,
            mechanism=self.cfg.privacy.mechanism,
        )
        if not check.would_exceed:
            return ""
        return (
            f"privacy budget: round {server_round} would take epsilon from "
            f"{check.spent_epsilon:.3f} to {check.epsilon_after:.3f}, over the budget "
            f"{policy.epsilon_budget:g} (delta {policy.delta:g})"
        )

    def _canaries(self) -> CanaryState | None:
        """This client's audit canaries (``audit-canaries``, simulations only), or None."""
        m = self.cfg.privacy.audit_canaries
        if not m:
            return None
        assert self.privacy_dir is not None  # a simulation always has one
        path = canary_file(self.privacy_dir, self.name)
        if path.is_file():
            return load_canaries(path)
        return CanaryState.create(
            m=m,
            num_coords=self.initial.size,
            clip_norm=self.cfg.privacy.max_grad_norm,
            seed=round_seed(self.cfg.federation.seed, 0, self.partition_id),
        )

    def _score_canaries(
        self, canaries: CanaryState | None, server_round: int, update: NDArray[np.float64]
    ) -> None:
        """Score the round's released update against the canaries (after it is stored)."""
        if canaries is None:
            return
        assert self.privacy_dir is not None
        canaries.add_release(server_round, update)
        canaries.save(canary_file(self.privacy_dir, self.name))
