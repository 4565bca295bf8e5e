"""The DP level of a round, as one small protocol: how it trains, what it does to the update.

``dp = "example"`` (DP-SGD) protects every record inside training: it trains with
Opacus and releases the trained adapter as it is. ``dp = "client"`` (DP-FedAvg with
distributed noise, :mod:`fedtune.privacy.client_level`) trains without DP and then
*transforms* the update, ``(start, trained) -> start + clip(trained - start, C) +
noise share``, the way Flower's client-side DP mod wraps a ClientApp: the training
code never asks which level it runs. :func:`dp_level` picks one by the config's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedtune.privacy import clip_update
from fedtune.privacy.discrete import KeystreamRandom, discrete_noisy_update
from fedtune.privacy.noise import ChaChaNoise

if TYPE_CHECKING:
    from fedtune.privacy.noise import NoiseSource
    from fedtune.train.loop import TrainResult
    from fedtune.train.plan import PrivacyPlan
    from fedtune.train.runtime import ClientRuntime

__all__ = ["ClientLevel", "DPLevel", "ExampleLevel", "dp_level"]


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
        self, runtime: ClientRuntime, seed: int, noise: NoiseSource, canaries: Any
    ) -> tuple[TrainResult, PrivacyPlan]:
        """Train the round; return the result and σ, q, steps as they ran."""
        ...

    def transform(
        self,
        start: NDArray[np.float64],
        trained: NDArray[np.float64],
        *,
        runtime: ClientRuntime,
        noise: NoiseSource,
        sampled_clients: int,
    ) -> Released:
        """What leaves the client, from the round's start and its trained adapter."""
        ...

    def ledger_fields(self, runtime: ClientRuntime, *, sampled_clients: int) -> dict[str, int]:
        """The level's own fields of the ledger record (0 where they do not apply)."""
        ...


class ExampleLevel:
    """DP-SGD: the noise is added inside training; the trained adapter is released."""

    name = "example"

    def refusal(self, plan: PrivacyPlan, *, sampled_clients: int) -> str:
        """Any number of sampled clients will do."""
        return ""

    def train(
        self, runtime: ClientRuntime, seed: int, noise: NoiseSource, canaries: Any
    ) -> tuple[TrainResult, PrivacyPlan]:
        """Opacus DP-SGD with this release's noise (and the auditor's canaries)."""
        return runtime._train_dpsgd(seed, noise, canaries=canaries)

    def transform(
        self,
        start: NDArray[np.float64],
        trained: NDArray[np.float64],
        *,
        runtime: ClientRuntime,
        noise: NoiseSource,
        sampled_clients: int,
    ) -> Released:
        """The trained adapter, weighted by the client's example count."""
        return Released(trained, runtime.num_train_examples)

    def ledger_fields(self, runtime: ClientRuntime, *, sampled_clients: int) -> dict[str, int]:
        """Batch size and local epochs (they fix q and the steps)."""
        train = runtime.cfg.train
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
        self, runtime: ClientRuntime, seed: int, noise: NoiseSource, canaries: Any
    ) -> tuple[TrainResult, PrivacyPlan]:
        """Plain local training; the plan is what the transform will use."""
        return runtime._train_plain(seed), runtime.plan

    def transform(
        self,
        start: NDArray[np.float64],
        trained: NDArray[np.float64],
        *,
        runtime: ClientRuntime,
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
        clip = runtime.cfg.privacy.max_grad_norm
        plan = runtime.plan
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

    def ledger_fields(self, runtime: ClientRuntime, *, sampled_clients: int) -> dict[str, int]:
        """The sampled clients and the tolerance (they size the noise shares)."""
        return {
            "batch_size": 0,
            "local_epochs": 0,
            "sampled_clients": sampled_clients,
            "tolerance": runtime.plan.tolerance,
        }


_LEVELS: dict[str, DPLevel] = {"example": ExampleLevel(), "client": ClientLevel()}


def dp_level(name: str) -> DPLevel:
    """The level for the config's ``dp`` value (``"example"`` or ``"client"``)."""
    return _LEVELS[name]
