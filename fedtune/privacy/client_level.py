"""Client-level DP (DP-FedAvg) with the noise split across clients.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018, https://arxiv.org/abs/1710.06963) protects whole clients:
each sampled client clips its model update Δ_k to L2 norm ``C`` and the server releases

    S = Σ_{k in sampled} clip(Δ_k, C) + N(0, σ² C² I).

Here the server must not see plaintext updates (they are CKKS-encrypted), so nobody
central can add the noise. Each of the ``m`` sampled clients adds its own share
``N(0, σ² C² / (m - t) · I)``: as long as at least ``m - t`` honest shares reach the sum
(at most ``t`` sampled clients dropped out or collude -- a key holder knows its own
share and could subtract it), the sum carries at least ``N(0, σ² C² I)``: distributed
DP with a stated tolerance, as in Kairouz, Liu & Steinke, "The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML 2021
(https://arxiv.org/abs/2102.06387). A round releases the clipped update and the share as
one exact grid value with a *discrete* Gaussian share
(:func:`fedtune.privacy.discrete.discrete_noisy_update`: no floating-point arithmetic
touches the noise, the rounding's extra sensitivity is paid for with at most 0.8% more
noise, the accounting below is unchanged); :func:`distributed_noise` is the continuous
float64 share it replaced, kept for comparison (``benchmarks/bench_discrete_noise.py``).
The server refuses a round in which fewer than ``m - t`` shares arrived
(``fedtune/apps/server/strategy.py``), so fewer shares never become a global state.

Accounting: the server chooses the clients from a seed it knows, so participation is
no secret from it and sampling amplifies nothing: each round a client takes part in is
one step of the Gaussian mechanism with noise multiplier σ and ``q = 1``
(:func:`compose_client_round`), under replace-one (one client's data replaced moves
the sum by at most ``2C``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fedtune.privacy._checks import check_positive, check_positive_int
from fedtune.privacy.accountant import AccountantState
from fedtune.privacy.noise import NoiseSource

__all__ = [
    "ClippedUpdate",
    "clip_update",
    "compose_client_round",
    "distributed_noise",
    "share_std",
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


def share_std(
    *, noise_multiplier: float, clip_norm: float, num_sampled_clients: int, tolerance: int
) -> float:
    """Std of one client's share, ``σ C / sqrt(m - t)``."""
    sigma = check_positive("noise_multiplier", noise_multiplier)
    clip = check_positive("clip_norm", clip_norm)
    m = check_positive_int("num_sampled_clients", num_sampled_clients)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or not 0 <= tolerance < m:
        raise ValueError(
            f"`tolerance` must be an integer in [0, {m - 1}] for {m} sampled clients, "
            f"got {tolerance!r}."
        )
    return sigma * clip / math.sqrt(m - tolerance)


def distributed_noise(
    shape: int | tuple[int, ...],
    *,
    noise_multiplier: float,
    clip_norm: float,
    num_sampled_clients: int,
    tolerance: int,
    noise: NoiseSource,
) -> np.ndarray:
    """Return one client's share of the aggregate Gaussian noise.

    Each entry is ``N(0, (σ C)² / (m - t))`` so that any ``m - t`` of the ``m`` sampled
    clients' shares sum to at least ``N(0, (σ C)²)``, the noise DP-FedAvg adds centrally.

    Parameters
    ----------
    shape
        Shape of the update vector.
    noise_multiplier
        σ, the noise multiplier of the whole round (as calibrated/accounted).
    clip_norm
        ``C``, the L2 bound every client clips its update to.
    num_sampled_clients
        ``m``, the clients sampled this round (as the server reports it).
    tolerance
        ``t``, sampled clients that may drop out or collude without the sum losing σ.
    noise
        The noise source (:class:`~fedtune.privacy.noise.CsprngNoise` on real data).
    """
    std = share_std(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        num_sampled_clients=num_sampled_clients,
        tolerance=tolerance,
    )
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    return noise.normal_numpy(dims, std)


def compose_client_round(state: AccountantState, *, noise_multiplier: float) -> AccountantState:
    """Add one DP-FedAvg round the client took part in: one step, ``q = 1``."""
    return state.compose(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
