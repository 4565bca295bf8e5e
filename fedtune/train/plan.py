"""A client's DP plan: σ, q and steps per round, fixed for the whole run before it starts."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config import RunConfig
from fedtune.errors import ConfigError
from fedtune.privacy import calibrate_noise, compute_epsilon
from fedtune.privacy.analysis import Relation

__all__ = ["RELATION", "PrivacyPlan", "check_evaluations_fit", "privacy_plan", "sampled_clients"]

#: The neighbouring relation of every fedtune release: the example count is public.
RELATION: Relation = "replace-one"


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


def privacy_plan(
    cfg: RunConfig,
    *,
    num_train_examples: int,
    eval_noise_multiplier: float | None = None,
    delta: float | None = None,
) -> PrivacyPlan:
    """σ, q and steps per round; σ calibrated once for the planned rounds if not given.

    ``delta`` is the node's own δ (:attr:`fedtune.privacy.policy.NodePolicy.delta`),
    at which σ is calibrated; ``None`` takes the run config's ``target-delta``
    (what a simulated client's policy holds anyway).

    Example level: ``q = batch-size / n_k``, ``steps = local-epochs * int(1 / q)``
    (Opacus' Poisson epochs). Client level: ``q = 1`` and one step per round: the
    server picks the clients from a seed it knows, so sampling amplifies nothing
    against it. Both under the replace-one relation (``n_k`` is public).
    """
    p, fed = cfg.privacy, cfg.federation
    if p.dp == "example":
        q = min(1.0, cfg.train.batch_size / num_train_examples)
        steps = cfg.train.local_epochs * int(1 / q)
    else:
        q, steps = 1.0, 1
    evaluations = (
        [] if eval_noise_multiplier is None else [(eval_noise_multiplier, 1.0, fed.num_rounds + 1)]
    )
    delta = p.target_delta if delta is None else delta
    if evaluations and not p.noise_multiplier:
        check_evaluations_fit(cfg, evaluations, delta=delta)
    sigma = p.noise_multiplier or calibrate_noise(
        target_epsilon=p.target_epsilon,
        target_delta=delta,
        sample_rate=q,
        steps=steps * fed.num_rounds,
        accountant=p.accountant,
        relation=RELATION,
        extra=evaluations,
        mechanism=p.mechanism,
    )
    return PrivacyPlan(
        level=p.dp,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        sampled_clients=sampled_clients(cfg),
        tolerance=p.client_dp_tolerance,
    )


def check_evaluations_fit(
    cfg: RunConfig, evaluations: list[tuple[float, float, int]], *, delta: float
) -> None:
    """Raise a ``ConfigError`` if the planned evaluations alone reach ``target-epsilon``."""
    p = cfg.privacy
    eps = compute_epsilon(evaluations, delta=delta, accountant=p.accountant, relation=RELATION)
    if eps >= p.target_epsilon:
        sigma, _, count = evaluations[0]
        raise ConfigError(
            f"the node's {count} planned held-out evaluations alone (policy "
            f"eval_noise_multiplier = {sigma:g}) spend ε = {eps:.3f}, not under "
            f"`target-epsilon` = {p.target_epsilon:g}: raise the node policy's "
            'eval_noise_multiplier or `target-epsilon`, or set its evaluation = "exact".'
        )
