"""Rounds, client sampling and the federation's size (``num-rounds``, ``fraction-*``, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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

    Each field's ``metadata["help"]`` is its key's one description (``--help`` and
    ``docs/configuration.md`` are generated from it, :mod:`fedtune.config.reference`).
    """

    num_rounds: int = field(default=5, metadata={"help": "Federated rounds (>= 1)."})
    num_clients: int = field(
        default=4,
        metadata={"help": "Simulated clients (SuperNodes); the data is split into this many."},
    )
    fraction_train: float = field(
        default=1.0,
        metadata={
            "help": "Share of connected clients sampled to train each round, in (0, 1] (at "
            "least `min-clients`)."
        },
    )
    fraction_evaluate: float = field(
        default=1.0,
        metadata={
            "help": "Share of connected clients sampled to evaluate each round, in (0, 1] (at "
            "least `min-clients`)."
        },
    )
    min_clients: int = field(
        default=2,
        metadata={
            "help": "Clients needed to start a round and to accept its result (<= `num-clients`)."
        },
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "One seed for data sampling, partitions, splits, adapter init, shuffling "
            "and client sampling."
        },
    )
    round_timeout: float = field(
        default=3600.0,
        metadata={
            "help": "Seconds to wait for a round's replies (a train message carries the "
            "previous round's evaluation too)."
        },
    )
    client_cpus: int = field(
        default=0,
        metadata={
            "help": "Simulation: CPU cores per simulated client (Ray runs cores // "
            "client-cpus clients at once); 0 = all cores (one client at a time)."
        },
    )
    client_gpus: float = field(
        default=-1.0,
        metadata={
            "help": "Simulation: GPUs per simulated client; -1 = automatic (1 when CUDA is "
            "present, else 0)."
        },
    )
    max_client_examples: int = field(
        default=50_000,
        metadata={
            "help": "The largest example count (FedAvg weight, an untrusted number) a client "
            "may claim; a larger one drops its reply. With encryption the server refuses "
            "to start unless `num-clients` x this x 64 <= 2^24, the CKKS range "
            '(fedtune/bounds.py); under `dp = "client"` every update claims 1.'
        },
    )
    max_weight_factor: float = field(
        default=4.0,
        metadata={
            "help": "A reply (train or evaluate) whose example count is more than this many "
            "times the upper median of the counts the round's other replies claim is "
            "dropped (with two replies, the other's count is the reference), so one node "
            "cannot outweigh the round's typical node by more; 0 turns it off. Every "
            "shipped federation fits (the Dirichlet split of simulations/noniid.toml has "
            "195 to 485 examples per client); raise it when honest sizes differ more."
        },
    )
    max_step_factor: float = field(
        default=10.0,
        metadata={
            "help": "No longer used (accepted for old run configs): key holders bound each "
            "decrypted global's movement from the configuration, scaled by the node "
            "policy's `max-step-slack`, which a run config cannot loosen or switch off "
            "(fedtune/movement.py, fedtune/guard.py)."
        },
    )
    partition_cache_size: int = field(
        default=128,
        metadata={
            "help": "Tokenised client partitions one worker process keeps (an LRU, >= 1); "
            "an evicted one is rebuilt, deterministically, from the data set the worker "
            "read and partitioned once (fedtune/train/shared.py)."
        },
    )

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
