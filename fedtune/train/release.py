"""A DP client's round as a *release*: replayed, refused or recorded before it leaves.

With DP on, a round is a release keyed by the client's own run nonce and a hash of
what the server sent (:mod:`fedtune.privacy.releases`): a retry with the same input
gets the stored reply verbatim, another input for a released round is refused, and
a new release is budget-checked first, trained at its DP level
(:mod:`fedtune.train.levels`), appended to the ledger and stored before its reply
leaves. Audit canaries (``audit-canaries``) are scored only after that.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fedtune import model as fmodel
from fedtune.aggregation import prescale
from fedtune.node.codes import CODES
from fedtune.privacy import PrivacyLedger, check_budget
from fedtune.privacy.canaries import CanaryState, canary_file, load_canaries
from fedtune.privacy.noise import CsprngNoise, SeededNoise
from fedtune.privacy.releases import StoredReply, input_hash, load_reply, run_nonce, store_reply
from fedtune.train.levels import dp_level
from fedtune.train.plan import RELATION
from fedtune.train.seeds import release_seed, round_seed
from fedtune.train.state import GlobalState, TrainOutcome

if TYPE_CHECKING:
    from fedtune.train.runtime import ClientRuntime

__all__ = ["client_canaries", "decline", "score_canaries", "train_private"]

log = logging.getLogger("fedtune.client")


def decline(runtime: ClientRuntime, code: str, detail: str) -> TrainOutcome:
    """Decline the round: ``code`` (one of :data:`fedtune.node.codes.CODES`) is sent.

    ``detail`` says why, with its numbers, and goes to this node's own log only: the
    reply's ``info.declined`` is the fixed code, a public constant.
    """
    if code not in CODES:
        raise ValueError(f"decline code {code!r} is not one of {sorted(CODES)}.")
    log.warning("%s declined a round (%s): %s", runtime.name, code, detail)
    return TrainOutcome(payload=None, num_examples=0, result=None, declined=code)


def train_private(
    runtime: ClientRuntime,
    state: GlobalState | None,
    start: NDArray[np.float64],
    *,
    server_round: int,
    sampled_clients: int,
) -> TrainOutcome:
    assert runtime.privacy_dir is not None  # checked in __init__
    p, plan = runtime.cfg.privacy, runtime.plan
    nonce = run_nonce(
        runtime.privacy_dir,
        client=runtime.name,
        run_id=runtime.run_id,
        config=runtime.cfg.to_flat(),
    )
    digest = input_hash(
        server_round=server_round,
        payload=None if state is None else state.payload,
        num_examples=0 if state is None else state.num_examples,
        sampled_clients=sampled_clients,
    )
    ledger = runtime.ledger()
    released = ledger.release(run_nonce=nonce, round=server_round, client=runtime.name)
    if released is not None:
        if released.input_hash != digest:
            return decline(
                runtime,
                "round-already-released",
                f"round {server_round} of this run was already released from another "
                "global state; a second release of one round is refused",
            )
        stored = load_reply(runtime.privacy_dir, client=runtime.name)
        if stored is None or (stored.run_nonce, stored.round, stored.input_hash) != (
            nonce,
            server_round,
            digest,
        ):
            return decline(
                runtime,
                "reply-not-stored",
                f"round {server_round} was already released and its reply is no longer "
                "stored; it is not trained again",
            )
        log.info("%s replays its reply to round %d (same input)", runtime.name, server_round)
        return TrainOutcome(
            payload=stored.payload,
            num_examples=stored.num_examples,
            result=None,
            epsilon=stored.epsilon,
            replayed=True,
        )
    m = sampled_clients
    level = dp_level(plan.level)
    refusal = level.refusal(plan, sampled_clients=m)
    if refusal:
        return decline(runtime, "dp-level-refused", refusal)
    refusal = _budget_refusal(runtime, server_round, ledger)
    if refusal:
        return decline(runtime, "budget-spent", refusal)
    noise = _noise_source(runtime, nonce, digest)
    fmodel.set_adapter_vector(runtime.model, start)
    seed = (
        secrets.randbits(63)
        if not p.seeded_noise
        else release_seed(runtime.cfg.federation.seed, nonce, digest)
    )
    canaries = client_canaries(runtime)
    with fmodel.seeded(seed):
        result, used = level.train(
            runtime, seed, noise, canaries and canaries.step_source(server_round)
        )
    trained = fmodel.get_adapter_vector(runtime.model)
    canary_update = trained - start  # scored once the release is recorded and stored
    out = level.transform(start, trained, runtime=runtime, noise=noise, sampled_clients=m)
    record = ledger.record(
        run_id=runtime.run_id,
        run_nonce=nonce,
        input_hash=digest,
        round=server_round,
        client=runtime.name,
        noise_multiplier=used.noise_multiplier,
        sample_rate=used.sample_rate,
        steps=used.steps,
        max_grad_norm=p.max_grad_norm,
        delta=runtime.policy.delta,  # the node's δ, never the server's
        accountant=p.accountant,
        relation=RELATION,
        level=plan.level,
        noise="seeded" if p.seeded_noise else "csprng",
        mechanism=p.mechanism,
        num_examples=runtime.num_train_examples,
        **level.ledger_fields(runtime, sampled_clients=m),
    )
    n = out.num_examples
    payload = runtime.codec.encode(prescale(out.vector, n))
    epsilon = float(record.epsilon)
    store_reply(
        runtime.privacy_dir,
        client=runtime.name,
        reply=StoredReply(
            run_nonce=nonce,
            round=server_round,
            input_hash=digest,
            payload=payload,
            num_examples=n,
            epsilon=epsilon,
        ),
    )
    score_canaries(runtime, canaries, server_round, canary_update)
    return TrainOutcome(payload=payload, num_examples=n, result=result, epsilon=epsilon)


def _noise_source(runtime: ClientRuntime, nonce: str, digest: str):  # type: ignore[no-untyped-def]

    if runtime.cfg.privacy.seeded_noise:
        return SeededNoise(release_seed(runtime.cfg.federation.seed, nonce, digest))
    return CsprngNoise()


def client_canaries(runtime: ClientRuntime):  # type: ignore[no-untyped-def]
    """This client's audit canaries (``audit-canaries``), or None."""
    m = runtime.cfg.privacy.audit_canaries
    if not m:
        return None

    assert runtime.privacy_dir is not None  # a simulation always has one
    path = canary_file(runtime.privacy_dir, runtime.name)
    if path.is_file():
        return load_canaries(path)
    seed = round_seed(runtime.cfg.federation.seed, 0, runtime.partition_id)
    return CanaryState.create(
        m=m,
        num_coords=runtime.initial.size,
        clip_norm=runtime.cfg.privacy.max_grad_norm,
        seed=seed,
    )


def score_canaries(
    runtime: ClientRuntime, canaries, server_round: int, update: NDArray[np.float64]
) -> None:  # type: ignore[no-untyped-def]
    if canaries is None:
        return

    assert runtime.privacy_dir is not None
    canaries.add_release(server_round, update)
    canaries.save(canary_file(runtime.privacy_dir, runtime.name))


def _budget_refusal(runtime: ClientRuntime, server_round: int, ledger: PrivacyLedger) -> str:
    p, plan, policy = runtime.cfg.privacy, runtime.plan, runtime.policy
    # The node's budget and δ (its policy), never the run config's.
    check = check_budget(
        ledger.history(client=runtime.name, level=plan.level),
        budget_epsilon=policy.epsilon_budget,
        delta=policy.delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        accountant=p.accountant,
        relation=RELATION,
        mechanism=p.mechanism,
    )
    if not check.would_exceed:
        return ""
    return (
        f"privacy budget: round {server_round} would take epsilon from "
        f"{check.spent_epsilon:.3f} to {check.epsilon_after:.3f}, over the budget "
        f"{policy.epsilon_budget:g} (delta {policy.delta:g})"
    )
