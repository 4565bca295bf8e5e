"""The DP level of a round, as one small protocol: how it trains, what it does to the update.

``dp = "example"`` (DP-SGD) protects every record inside training: it trains with
Opacus and releases the trained adapter as it is. ``dp = "client"`` (DP-FedAvg with
distributed noise, :mod:`fedtune.privacy.client_level`) trains without DP and then
*transforms* the update, ``(start, trained) -> start + clip(trained - start, C) +
noise share``, the way Flower's client-side DP mod wraps a ClientApp: the training
code never asks which level it runs. :func:`dp_level` picks one by the config's name.

A level works on a plain :class:`fedtune.train.trainer.Trainer` and the round's
:class:`fedtune.train.plan.PrivacyPlan`; the round that keys, records and stores the
release is :class:`fedtune.train.runtime.ClientRuntime`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from fedtune.privacy import clip_update
from fedtune.privacy.discrete import KeystreamRandom, discrete_noisy_update
from fedtune.privacy.dpsgd import make_dp_training
from fedtune.privacy.noise import ChaChaNoise
from fedtune.train.loop import TrainResult, make_optimizer, train_local
from fedtune.train.plan import PrivacyPlan
from fedtune.train.shared import release_model
from fedtune.train.trainer import Trainer

if TYPE_CHECKING:
    from fedtune.privacy.noise import NoiseSource

__all__ = ["ClientLevel", "DPLevel", "ExampleLevel", "Released", "dp_level", "train_dpsgd"]


@dataclass(frozen=True)
class Released:
    """The vector a round releases and the example count it is weighted by."""

    vector: NDArray[np.float64]
    num_examples: int


class DPLevel(Protocol):
    """What one DP level does in a round; see the module docstring."""

    name: str

    def refusal(self, plan: PrivacyPlan, *, sampled_clients: int) -> str:
        """Why this round cannot be released at this level ("" if it can)."""
        ...

    def train(
        self, trainer: Trainer, plan: PrivacyPlan, seed: int, noise: NoiseSource, canaries: Any
    ) -> tuple[TrainResult, PrivacyPlan]:
        """Train the round; return the result and σ, q, steps as they ran."""
        ...

    def transform(
        self,
        start: NDArray[np.float64],
        trained: NDArray[np.float64],
        *,
        trainer: Trainer,
        plan: PrivacyPlan,
        noise: NoiseSource,
        sampled_clients: int,
    ) -> Released:
        """What leaves the client, from the round's start and its trained adapter."""
        ...

    def ledger_fields(
        self, trainer: Trainer, plan: PrivacyPlan, *, sampled_clients: int
    ) -> dict[str, int]:
        """The level's own fields of the ledger record (0 where they do not apply)."""
        ...


class ExampleLevel:
    """DP-SGD: the noise is added inside training; the trained adapter is released."""

    name = "example"

    def refusal(self, plan: PrivacyPlan, *, sampled_clients: int) -> str:
        """Any number of sampled clients will do."""
        return ""

    def train(
        self, trainer: Trainer, plan: PrivacyPlan, seed: int, noise: NoiseSource, canaries: Any
    ) -> tuple[TrainResult, PrivacyPlan]:
        """Opacus DP-SGD with this release's noise (and the auditor's canaries)."""
        return train_dpsgd(trainer, plan, seed, noise, canaries=canaries)

    def transform(
        self,
        start: NDArray[np.float64],
        trained: NDArray[np.float64],
        *,
        trainer: Trainer,
        plan: PrivacyPlan,
        noise: NoiseSource,
        sampled_clients: int,
    ) -> Released:
        """The trained adapter, weighted by the client's example count."""
        return Released(trained, trainer.num_train_examples)

    def ledger_fields(
        self, trainer: Trainer, plan: PrivacyPlan, *, sampled_clients: int
    ) -> dict[str, int]:
        """Batch size and local epochs (they fix q and the steps)."""
        train = trainer.cfg.train
        return {
            "batch_size": train.batch_size,
            "local_epochs": train.local_epochs,
            "sampled_clients": 0,
            "tolerance": 0,
        }


class ClientLevel:
    """DP-FedAvg: train without DP, clip the update to C, add this client's noise share."""

    name = "client"

    def refusal(self, plan: PrivacyPlan, *, sampled_clients: int) -> str:
        """The noise shares add up only for between ``t + 1`` and the planned ``m`` clients."""
        m = sampled_clients
        if plan.tolerance < m <= plan.sampled_clients:
            return ""
        return (
            f"client-level DP: the server says {m} client(s) train this round; the "
            f"noise shares need between {plan.tolerance + 1} and the planned "
            f"{plan.sampled_clients} (`client-dp-tolerance` = {plan.tolerance})"
        )

    def train(
        self, trainer: Trainer, plan: PrivacyPlan, seed: int, noise: NoiseSource, canaries: Any
    ) -> tuple[TrainResult, PrivacyPlan]:
        """Plain local training; the plan is what the transform will use."""
        return trainer.fit(seed), plan

    def transform(
        self,
        start: NDArray[np.float64],
        trained: NDArray[np.float64],
        *,
        trainer: Trainer,
        plan: PrivacyPlan,
        noise: NoiseSource,
        sampled_clients: int,
    ) -> Released:
        """``start + clip(trained - start, C) + share``, weighted as one client.

        The clipped update and the share are one exact grid value, ``g (round(x / g) +
        K)`` with a discrete Gaussian ``K`` (:mod:`fedtune.privacy.discrete`): no
        floating-point arithmetic touches the noise (issue 26).
        """
        if not isinstance(noise, ChaChaNoise):
            raise TypeError(f"client-level DP draws from a ChaChaNoise keystream, got {noise!r}.")
        clip = trainer.cfg.privacy.max_grad_norm
        clipped = clip_update(trained - start, clip_norm=clip).clipped
        noised = discrete_noisy_update(
            clipped,
            noise_multiplier=plan.noise_multiplier,
            clip_norm=clip,
            num_sampled_clients=sampled_clients,
            tolerance=plan.tolerance,
            rng=KeystreamRandom(noise),
        )
        return Released(start + noised.values, 1)

    def ledger_fields(
        self, trainer: Trainer, plan: PrivacyPlan, *, sampled_clients: int
    ) -> dict[str, int]:
        """The sampled clients and the tolerance (they size the noise shares)."""
        return {
            "batch_size": 0,
            "local_epochs": 0,
            "sampled_clients": sampled_clients,
            "tolerance": plan.tolerance,
        }


_LEVELS: dict[str, DPLevel] = {"example": ExampleLevel(), "client": ClientLevel()}


def dp_level(name: str) -> DPLevel:
    """The level for the config's ``dp`` value (``"example"`` or ``"client"``)."""
    return _LEVELS[name]


def train_dpsgd(
    trainer: Trainer, plan: PrivacyPlan, seed: int, noise: NoiseSource, canaries: Any = None
) -> tuple[TrainResult, PrivacyPlan]:
    """One round of DP-SGD (Opacus) on ``trainer``; the result and σ, q, steps as they ran."""

    cfg = trainer.cfg
    optimizer = make_optimizer(trainer.model, cfg.train)
    trainer.model.train()
    dp = make_dp_training(
        module=trainer.model,
        optimizer=optimizer,
        data=trainer.train_set,  # type: ignore[arg-type]  # a map-style Dataset
        expected_batch_size=cfg.train.batch_size,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        generator=torch.Generator().manual_seed(seed),
        noise=noise,
        grid=cfg.privacy.dp_noise == "grid",
        collate_fn=trainer.train_set.collate_fn(),
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
                device=trainer.device,
                optimizer=dp.optimizer,
                loss_fn=trainer.loss_fn,
                private=True,
            )
    finally:
        trainer.model = dp.close()
        release_model(trainer.model)  # the next client of this worker starts clean
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
