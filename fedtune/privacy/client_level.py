"""Client-level DP (DP-FedAvg) with the noise split across clients.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018, https://arxiv.org/abs/1710.06963) protects whole clients:
each sampled client clips its model update Δ_k to L2 norm ``C`` and the server releases

    S = Σ_{k in sampled} clip(Δ_k, C) + N(0, σ² C² I).

Here the server must not see plaintext updates (they are CKKS-encrypted), so nobody
central can add the noise. Each of the ``m`` sampled clients adds its own share
``N(0, σ² C² / m · I)``; the shares are independent, so their sum over the ``m`` clients
is exactly ``N(0, σ² C² I)`` -- distributed DP as in Kairouz, Liu & Steinke, "The
Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
ICML 2021 (https://arxiv.org/abs/2102.06387), with continuous Gaussians because CKKS
aggregates reals.

Accounting: one round is one step of the sampled Gaussian mechanism with noise
multiplier σ and sampling rate ``q = m / N`` (N = clients in the population); see
:func:`compose_client_round`. Two caveats the caller must respect:

* The Poisson-sampling analysis assumes each client joins a round independently with
  probability q; sampling exactly m clients is the usual approximation (as in McMahan
  et al. 2018), and the server should divide S by the *expected* m, not the realised one.
* If only ``k < m`` sampled clients survive to the aggregate, the sum holds only k noise
  shares: std ``σ C sqrt(k/m)``. Account such a round with
  :func:`effective_noise_multiplier` (σ·sqrt(k/m)), never with σ.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fedtune.privacy._checks import check_positive, check_positive_int
from fedtune.privacy.accounting import AccountantState

__all__ = [
    "ClippedUpdate",
    "clip_update",
    "compose_client_round",
    "distributed_noise",
    "effective_noise_multiplier",
]


class ClippedUpdate(NamedTuple):
    """Result of :func:`clip_update`: the clipped vector and the norm before clipping."""

    clipped: np.ndarray
    norm: float


def clip_update(delta_vec: np.ndarray, *, clip_norm: float) -> ClippedUpdate:
    """Scale ``delta_vec`` to L2 norm at most ``clip_norm``: ``Δ · min(1, C / ||Δ||₂)``.

    The input is not modified. Non-finite entries raise ``ValueError`` (a NaN update
    would make the norm NaN and the clip a no-op, silently voiding the guarantee).
    """
    clip_norm = check_positive("clip_norm", clip_norm)
    vec = np.asarray(delta_vec, dtype=np.float64)
    if not np.all(np.isfinite(vec)):
        raise ValueError("`delta_vec` contains NaN or inf entries; refusing to clip it.")
    norm = float(np.linalg.norm(vec.ravel()))
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return ClippedUpdate(clipped=vec * scale, norm=norm)


def distributed_noise(
    shape: int | tuple[int, ...],
    *,
    noise_multiplier: float,
    clip_norm: float,
    num_sampled_clients: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """Return one client's share of the aggregate Gaussian noise.

    Each entry is ``N(0, (σ C)² / m)`` so that the sum of the ``m`` sampled clients'
    shares is ``N(0, (σ C)²)``, the noise DP-FedAvg adds centrally.

    Parameters
    ----------
    shape
        Shape of the update vector.
    noise_multiplier
        σ, the noise multiplier of the whole round (as calibrated/accounted).
    clip_norm
        ``C``, the L2 bound every client clips its update to.
    num_sampled_clients
        ``m``, the number of clients whose shares are summed.
    generator
        Source of randomness (``np.random.default_rng(seed)``; a CSPRNG-backed
        ``Generator`` in deployments).
    """
    sigma = check_positive("noise_multiplier", noise_multiplier)
    clip = check_positive("clip_norm", clip_norm)
    m = check_positive_int("num_sampled_clients", num_sampled_clients)
    if not isinstance(generator, np.random.Generator):
        raise ValueError(
            f"`generator` must be a numpy.random.Generator, got {type(generator).__name__}."
        )
    return generator.normal(0.0, sigma * clip / math.sqrt(m), size=shape)


def effective_noise_multiplier(
    *, noise_multiplier: float, num_sampled_clients: int, num_aggregated_clients: int
) -> float:
    """σ actually delivered when only ``k`` of the ``m`` noise shares reach the sum: σ·sqrt(k/m)."""
    sigma = check_positive("noise_multiplier", noise_multiplier)
    m = check_positive_int("num_sampled_clients", num_sampled_clients)
    k = check_positive_int("num_aggregated_clients", num_aggregated_clients)
    if k > m:
        raise ValueError(
            f"`num_aggregated_clients` ({k}) cannot exceed `num_sampled_clients` ({m})."
        )
    return sigma * math.sqrt(k / m)


def compose_client_round(
    state: AccountantState, *, noise_multiplier: float, num_sampled_clients: int, num_clients: int
) -> AccountantState:
    """Add one DP-FedAvg round: one step with q = ``num_sampled_clients / num_clients``."""
    m = check_positive_int("num_sampled_clients", num_sampled_clients)
    n = check_positive_int("num_clients", num_clients)
    if m > n:
        raise ValueError(f"`num_sampled_clients` ({m}) cannot exceed `num_clients` ({n}).")
    return state.compose(noise_multiplier=noise_multiplier, sample_rate=m / n, steps=1)
