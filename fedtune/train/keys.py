"""How a DP client keys its releases: its run nonce, what a release answers, its noise.

A release (a trained update, a noisy evaluation) is keyed by the client's own run
nonce and a SHA-256 of the input it answers (:mod:`fedtune.privacy.releases`): the
same input gets the stored answer back, another input for a released round is
refused. Its noise comes from the CSPRNG, or, with ``seeded-noise`` (simulations
only), from a seed derived from the run seed, the nonce and that input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.privacy.noise import CsprngNoise, NoiseSource, SeededNoise
from fedtune.privacy.releases import input_hash, run_nonce
from fedtune.train.seeds import release_seed

if TYPE_CHECKING:
    from fedtune.train.state import GlobalState

__all__ = ["ReleaseKeys", "state_digest"]


def state_digest(state: GlobalState | None) -> str:
    """SHA-256 (hex) of the global state evaluated, independent of its round number."""
    return input_hash(
        server_round=0,
        payload=None if state is None else state.payload,
        num_examples=0 if state is None else state.num_examples,
        sampled_clients=0,
    )


@dataclass(frozen=True)
class ReleaseKeys:
    """One client's release keys in one run (its ledger lives beside them)."""

    privacy_dir: Path
    client: str
    run_id: str
    #: The flat run config the nonce is bound to (a new config is a new run).
    config: Mapping[str, object]
    seed: int
    seeded_noise: bool

    def nonce(self) -> str:
        """This client's nonce for this run, made on first sight (kept in its directory)."""
        return run_nonce(
            self.privacy_dir, client=self.client, run_id=self.run_id, config=self.config
        )

    @staticmethod
    def train_input(state: GlobalState | None, *, server_round: int, sampled_clients: int) -> str:
        """SHA-256 (hex) of what a train message asks: its round, global and sample size."""
        return input_hash(
            server_round=server_round,
            payload=None if state is None else state.payload,
            num_examples=0 if state is None else state.num_examples,
            sampled_clients=sampled_clients,
        )

    def release_seed(self, nonce: str, label: str) -> int:
        """The seed of the release ``label`` under ``nonce`` (only with ``seeded-noise``)."""
        return release_seed(self.seed, nonce, label)

    def noise(self, nonce: str, label: str) -> NoiseSource:
        """The release's noise: seeded by ``(seed, nonce, label)`` in a simulation, else CSPRNG."""
        if self.seeded_noise:
            return SeededNoise(self.release_seed(nonce, label))
        return CsprngNoise()
