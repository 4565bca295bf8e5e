"""Rounds, client sampling and the federation's size (``num-rounds``, ``fraction-*``, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config._checks import require

__all__ = ["FederationConfig", "sample_size"]


def sample_size(connected: int, fraction: float, min_clients: int) -> int:
    """Clients sampled from ``connected`` at ``fraction``: ``min(K, max(ceil(f K), m))``.

    The one sampling formula: the server's strategy samples this many nodes per
    round, and a client sizes its client-level DP noise share by it
    (:attr:`FederationConfig.sampled_per_round`).
    """
    return min(connected, max(math.ceil(fraction * connected), min_clients))


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, client sampling and the simulated federation's size.

    ``client-cpus`` / ``client-gpus`` are the simulation engine's resources per
    simulated client (Ray runs ``cores // client-cpus`` clients at once).

    ``max-client-examples`` caps the example count a client may claim (its FedAvg
    weight, an untrusted number): the server drops a reply above it, and with
    encryption on refuses to start unless ``num-clients x max-client-examples x 64``
    fits the CKKS range (``2 ** 24`` by default; see :mod:`fedtune.bounds`).

    ``max-weight-factor`` caps a count relative to the round: the server drops a reply
    whose ``num-examples`` is more than this many times the upper median of the counts
    the round's other replies claim, so one node cannot outweigh the round's typical
    node by more than this factor (0 turns it off). The default, 4, admits every
    shipped federation (the Dirichlet split of ``simulations/noniid.toml`` has sizes
    195 to 485; the silos are equal).

    ``max-step-factor`` is accepted and not used (a run config may still set it): key holders
    bound each decrypted global's movement from the configuration
    (:mod:`fedtune.movement`, :mod:`fedtune.guard`), scaled by the node policy's
    ``max-step-slack``, which a run config cannot loosen or switch off.

    ``partition-cache-size`` bounds the tokenised client partitions one worker
    process keeps (an LRU, :mod:`fedtune.train.shared`); an evicted one is rebuilt,
    deterministically, from the data set the worker read and partitioned once.
    """

    num_rounds: int = 5
    num_clients: int = 4
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int = 2
    seed: int = 42
    round_timeout: float = 3600.0
    client_cpus: int = 0
    client_gpus: float = -1.0
    max_client_examples: int = 50_000
    max_weight_factor: float = 4.0
    max_step_factor: float = 10.0
    partition_cache_size: int = 128

    def __post_init__(self) -> None:
        require(
            self.partition_cache_size >= 1,
            "partition-cache-size",
            self.partition_cache_size,
            "must be >= 1 (tokenised client partitions a worker process keeps)",
        )
        require(self.num_rounds >= 1, "num-rounds", self.num_rounds, "must be >= 1")
        require(
            self.max_step_factor == 0 or self.max_step_factor >= 1,
            "max-step-factor",
            self.max_step_factor,
            "must be >= 1, or 0 to turn the key holders' step check off",
        )
        require(
            self.max_client_examples >= 1,
            "max-client-examples",
            self.max_client_examples,
            "must be >= 1 (the largest example count a client may claim)",
        )
        require(
            self.max_weight_factor == 0 or self.max_weight_factor >= 1,
            "max-weight-factor",
            self.max_weight_factor,
            "must be >= 1 (how many times the round's median count one node may claim), "
            "or 0 to turn the relative cap off",
        )
        require(self.num_clients >= 1, "num-clients", self.num_clients, "must be >= 1")
        require(
            0.0 < self.fraction_train <= 1.0,
            "fraction-train",
            self.fraction_train,
            "must be in (0, 1]",
        )
        require(
            0.0 < self.fraction_evaluate <= 1.0,
            "fraction-evaluate",
            self.fraction_evaluate,
            "must be in (0, 1]",
        )
        require(self.min_clients >= 1, "min-clients", self.min_clients, "must be >= 1")
        require(self.round_timeout > 0, "round-timeout", self.round_timeout, "must be > 0")
        require(
            self.client_cpus >= 0,
            "client-cpus",
            self.client_cpus,
            "must be >= 0 (0 = all cores, one simulated client at a time)",
        )
        require(
            self.client_gpus == -1.0 or self.client_gpus >= 0,
            "client-gpus",
            self.client_gpus,
            "must be >= 0, or -1 for automatic (1 when CUDA is present, else 0)",
        )

    def sampled(self, connected: int, fraction: float) -> int:
        """Clients sampled from ``connected`` at ``fraction`` (at least ``min-clients``)."""
        return sample_size(connected, fraction, self.min_clients)

    @property
    def sampled_per_round(self) -> int:
        """Clients trained per round when all ``num-clients`` are connected."""
        return self.sampled(self.num_clients, self.fraction_train)
