"""Opacus' ``DPOptimizer`` releasing DP-SGD's noisy gradient sum on an exact grid.

DP-SGD (Abadi et al. 2016) releases, per logical batch, the sum of the clipped
per-example gradients plus Gaussian noise. Here that release is float-safe
(``docs/float-noise.md``): each clipped per-example gradient ``c_i`` (``||c_i|| <= C``) is
rounded to a power-of-two grid, the integer vectors are summed exactly, and an exact
discrete Gaussian is added (Canonne, Kamath & Steinke, NeurIPS 2020,
https://arxiv.org/abs/2004.00010; :mod:`fedtune.privacy.discrete_array`)::

    released = g * (sum_i round(c_i / g) + K),    K ~ N_Z(0, s^2)^d,

over the ``d`` trainable parameters flattened, with ``g`` and ``s`` from :func:`dpsgd_grid`.
Replacing one example replaces one integer vector ``k_i = round(c_i / g)``, whose norm is
at most ``R = C / g + sqrt(d) / 2`` (checked for every row), so each of the two mixture
components of the replace-one pair (:mod:`fedtune.privacy.analysis`) is shifted from the
common base by at most ``R``; ``s >= σ R`` makes the noise multiplier with respect to
``R`` at least the ledger's σ. Division by the expected batch size, the cast to the
parameter dtype and the optimizer step are post-processing. Bits: the
:class:`~fedtune.privacy.noise.ChaChaNoise` keystream of ``noise=`` (a
:class:`~fedtune.privacy.noise.SeededNoise` replays a run). Audit canaries
(:mod:`fedtune.privacy.canaries`) join the per-example gradients before clipping.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from fedtune.privacy import discrete_array
from fedtune.privacy._checks import check_positive, check_positive_int
from fedtune.privacy.discrete import KeystreamRandom, grid_step, round_up_variance
from fedtune.privacy.discrete_array import (
    fits_vectorised,
    max_vectorised_scale,
)
from fedtune.privacy.noise import ChaChaNoise, NoiseSource

__all__ = ["SgdGrid", "dpsgd_grid", "sourced_dp_optimizer"]

#: The rounding may cost at most this factor of noise before the grid is refused.
MAX_INFLATION = 1.25
#: Float64 clipping may overshoot C by a few ulps: the accounted row bound allows 2^-30.
_CLIP_SLACK = 2.0**-30
_EXACT = 1 << 53


@dataclass(frozen=True)
class SgdGrid:
    """The grid of one DP-SGD release (see :func:`dpsgd_grid`)."""

    #: The grid step ``g`` (a power of two).
    grid: float
    #: ``R = C (1 + 2^-30) / g + sqrt(d) / 2``: the bound on one rounded example, in steps.
    row_bound: float
    #: ``s^2`` of the integer noise, ``(σ R)^2`` rounded up.
    sigma2: Fraction
    #: ``s / R``: the noise multiplier with respect to the rounded sensitivity, >= σ.
    effective_noise_multiplier: float


def dpsgd_grid(*, clip_norm: float, noise_multiplier: float, dim: int) -> SgdGrid:
    """The grid step and discrete noise scale of a DP-SGD release of ``dim`` parameters.

    ``g`` starts at :func:`fedtune.privacy.discrete.grid_step` (``g sqrt(d) <= 2C 2^-7``,
    0.8% more noise) and is doubled while ``s = σ R`` is beyond the vectorised sampler's
    range (:func:`fedtune.privacy.discrete_array.max_vectorised_scale`), as long as the
    noise inflation ``R g / C`` stays at most :data:`MAX_INFLATION`.

    Raises
    ------
    ValueError
        If no grid fits (``σ sqrt(d)`` too large): the message names the values.
    """

    clip = check_positive("max_grad_norm", clip_norm)
    sigma = check_positive("noise_multiplier", noise_multiplier)
    dim = check_positive_int("dim", dim)
    limit = max_vectorised_scale()
    grid = grid_step(clip_norm=clip, dim=dim)
    while True:
        row = clip * (1.0 + _CLIP_SLACK) / grid + math.sqrt(dim) / 2.0
        if row * grid / clip > MAX_INFLATION:
            raise ValueError(
                f"no DP-SGD grid fits noise_multiplier = {sigma} with {dim} trainable "
                f"parameters: the discrete noise scale would exceed s^2 = {limit} or cost more "
                f"than {MAX_INFLATION}x noise; lower `noise-multiplier` or train fewer "
                "parameters (e.g. a smaller LoRA rank)."
            )
        sigma2 = round_up_variance((Fraction(sigma) * Fraction(row)) ** 2)
        if fits_vectorised(sigma2):
            return SgdGrid(grid, row, sigma2, math.sqrt(sigma2) / row)
        grid *= 2.0


@functools.cache
def sourced_dp_optimizer() -> type[Any]:
    """Opacus' ``DPOptimizer`` with clipping, rounding and noise on an exact grid.

    Built on first use so that importing this module does not import Opacus. The class
    takes ``noise=`` (keyword-only, a :class:`~fedtune.privacy.noise.ChaChaNoise` for the
    grid noise) plus ``DPOptimizer``'s own arguments (no ``generator`` / ``secure_mode``).
    Per logical batch: per-example clipping in float64 (Opacus' factor
    ``min(1, C / (||g_i|| + 1e-6))``), rounding of each clipped row to the grid, an exact
    integer sum in ``summed_grad`` (float64 holding integers, across the physical parts
    of a virtual step), one discrete Gaussian draw, ``* g``, then Opacus' division by
    ``expected_batch_size`` and the wrapped optimizer's step. ``self.last_release`` keeps
    the last released integer vector's grid (for tests).
    """
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SourcedDPOptimizer(DPOptimizer):  # type: ignore[misc]
        def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            *,
            noise: NoiseSource,
            grid: bool = True,
            **kwargs: Any,
        ) -> None:
            super().__init__(optimizer, generator=None, secure_mode=False, **kwargs)
            #: True: the exact grid release (``dp-noise = "grid"``, mechanism
            #: "discrete-gaussian"); False: float64 Gaussian noise (``"float"``).
            self.on_grid = bool(grid)
            if self.on_grid and not isinstance(noise, ChaChaNoise):
                raise TypeError(
                    f"`noise` must be a ChaChaNoise (CsprngNoise or SeededNoise): DP-SGD's "
                    f"discrete noise reads its keystream; got {noise!r}."
                )
            self.noise = noise
            self._bits = KeystreamRandom(noise) if isinstance(noise, ChaChaNoise) else None
            self.canaries: Any = None  # a fedtune.privacy.canaries.CanaryStep, audits only
            self.canary_rate = 0.0
            self.last_release: SgdGrid | None = None

        def grid(self) -> SgdGrid:
            """This step's grid (``σ = 0``, for tests only, keeps the grid of σ = 1)."""
            dim = sum(p.numel() for p in self.params)
            sigma = self.noise_multiplier if self.noise_multiplier > 0 else 1.0
            return _cached_grid(float(self.max_grad_norm), float(sigma), int(dim))

        def clip_and_accumulate(self) -> None:
            # Canary records join the batch, to be clipped: once per logical batch, with
            # its last physical part (fedtune.privacy.virtual), as one more set of rows.
            last_part = not self._check_skip_next_step(pop_next=False)
            if self.canaries is not None and last_part:
                rows = self.canaries.rows(self.params, sample_rate=self.canary_rate)
                for p, extra in zip(self.params, rows, strict=True):
                    if len(extra):
                        own = p.grad_sample
                        own = torch.cat(own) if isinstance(own, list) else own
                        p.grad_sample = torch.cat([own, extra.to(own.dtype)])
            if self.on_grid:
                self._clip_round_accumulate()  # norms and clipping in float64
            else:
                self._upcast_grad_samples()
                super().clip_and_accumulate()

        def _upcast_grad_samples(self) -> None:
            """Per-example gradients in the parameter's dtype before Opacus clips them.

            Under bf16 autocast (``precision = "bf16"``) Opacus' hooks return bfloat16
            per-example gradients, and its ``clip_and_accumulate`` takes their norms in
            that dtype: a norm rounded down by bfloat16 (8 bits) would let a clipped row
            exceed ``C`` by up to 0.4%. Norms and factors must come from the values summed.
            """
            for p in self.params:
                sample = getattr(p, "grad_sample", None)
                if sample is None:
                    continue  # Opacus names the missing per-example gradient
                _check_processed_flag(sample)  # a reused (stepped) sample stays an error
                if isinstance(sample, list):
                    sample = torch.cat(sample)
                if sample.dtype != p.dtype:
                    p.grad_sample = sample.to(p.dtype)

        def _clip_round_accumulate(self) -> None:
            spec = self.grid()
            samples = [
                self._get_flat_grad_sample(p).to(torch.float64, copy=True) for p in self.params
            ]
            rows = len(samples[0])
            if rows:
                norms = torch.stack([s.reshape(rows, -1).norm(2, dim=-1) for s in samples], 1)
                factor = self._clip_factors(norms.norm(2, dim=1))
            else:
                factor = torch.zeros(0, dtype=torch.float64, device=samples[0].device)
            square = torch.zeros(rows, dtype=torch.float64, device=samples[0].device)
            for p, s in zip(self.params, samples, strict=True):
                _check_processed_flag(p.grad_sample)
                scale = (factor / spec.grid).to(s.device).view(-1, *([1] * (s.dim() - 1)))
                ints = s.mul_(scale).round_()  # s is this step's float64 copy
                if rows:
                    norm = torch.linalg.vector_norm(ints.reshape(rows, -1), dim=1)
                    square += norm.square().to(square.device)
                summed = ints.sum(dim=0)
                p.summed_grad = summed if p.summed_grad is None else p.summed_grad + summed
                _mark_as_processed(p.grad_sample)
            self._check_rows(square, spec)

        def _clip_factors(self, norms: torch.Tensor) -> torch.Tensor:
            """Opacus' per-example factors ``min(1, C / (||g_i|| + 1e-6))``, in float64."""
            return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

        def _check_rows(self, square: torch.Tensor, spec: SgdGrid) -> None:
            """Refuse a step whose rounded rows exceed the accounted ``R`` (a bug guard)."""
            if len(square) and float(square.max()) > spec.row_bound**2:
                raise RuntimeError(
                    f"a rounded example has norm {math.sqrt(float(square.max())):.9g} grid "
                    f"steps > the accounted bound R = {spec.row_bound:.9g}; refusing to "
                    "release this step (clipping is broken)."
                )

        def add_noise(self) -> None:
            if self.on_grid:
                self._add_grid_noise()
            else:
                self._add_float_noise()

        def _add_float_noise(self) -> None:
            """``summed_grad + N(0, (σ C)² I)`` in float64, one keystream draw per device."""
            std = self.noise_multiplier * self.max_grad_norm
            on_device: dict[torch.device, list[Any]] = {}  # parameters with summed_grad
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                on_device.setdefault(p.summed_grad.device, []).append(p)
            for device, params in on_device.items():
                sizes = [p.summed_grad.numel() for p in params]
                flat = self.noise.normal((sum(sizes),), std, device=device, dtype=torch.float64)
                for p, z in zip(params, flat.split(sizes), strict=True):
                    summed = p.summed_grad
                    noisy = summed.to(torch.float64) + z.view(summed.shape)
                    p.grad = noisy.to(summed.dtype).view_as(p)
                    _mark_as_processed(p.summed_grad)

        def _add_grid_noise(self) -> None:
            spec = self.grid()
            params = list(self.params)
            for p in params:
                _check_processed_flag(p.summed_grad)
            sizes = [p.summed_grad.numel() for p in params]
            flat = torch.cat([p.summed_grad.reshape(-1).to("cpu") for p in params]).numpy()
            if not np.all(np.isfinite(flat)) or float(np.abs(flat).max(initial=0.0)) >= 2**52:
                raise RuntimeError("the rounded gradient sum is not finite or beyond 2^52.")
            total = flat.astype(np.int64)
            if self.noise_multiplier > 0:
                assert self._bits is not None  # checked in __init__ for the grid
                total += discrete_array.discrete_gaussian_array(spec.sigma2, total.size, self._bits)
            if total.size and int(np.abs(total).max()) >= _EXACT:
                raise RuntimeError("the released integers reach 2^53; float64 cannot hold them.")
            released = torch.from_numpy(total.astype(np.float64) * spec.grid)  # exact
            for p, part in zip(params, released.split(sizes), strict=True):
                summed = p.summed_grad
                p.grad = part.view(summed.shape).to(device=summed.device, dtype=p.dtype)
                _mark_as_processed(p.summed_grad)
            self.last_release = spec

        def scale_grad(self) -> None:
            # Opacus' own, with ``accumulated_iterations`` (a pass over every parameter)
            # computed once instead of once per parameter: 1.4 ms of a 12 ms DP step.
            if self.loss_reduction == "mean":
                divisor = self.expected_batch_size * self.accumulated_iterations
                for p in self.params:
                    p.grad /= divisor

    return SourcedDPOptimizer


@functools.lru_cache(maxsize=16)
def _cached_grid(clip_norm: float, noise_multiplier: float, dim: int) -> SgdGrid:
    return dpsgd_grid(clip_norm=clip_norm, noise_multiplier=noise_multiplier, dim=dim)
