"""DP-SGD for one local round, wired from Opacus' parts without a ``PrivacyEngine``.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
https://arxiv.org/abs/1607.00133): every step samples a Poisson batch (each example
independently with probability q), clips each example's gradient to L2 norm ``C`` and
adds ``N(0, σ² C² I)`` to the sum before averaging by the *expected* batch size.

:func:`make_dp_training` builds exactly those three pieces from Opacus --
``GradSampleModule`` (hooks mode: per-sample gradients), ``DPOptimizer`` (clip + noise)
and ``DPDataLoader`` (Poisson sampling) -- and nothing else: no ``PrivacyEngine``, whose
accountant would restart at zero every round. Accounting lives in
:mod:`fedtune.privacy.accountant` / :mod:`fedtune.privacy.ledger`; the round's
composition is ``(noise_multiplier, sample_rate, steps actually taken)``.

Before wrapping, the model is checked (:func:`check_dp_compatible`):

* every trainable sub-module must have a registered Opacus grad sampler (``nn.Linear``,
  ``nn.LayerNorm``, ``nn.Embedding``, convolutions, norms...); PEFT's LoRA ``A``/``B``
  are ``nn.Linear`` and a ``modules_to_save`` head is a plain copy, so a LoRA-wrapped
  BERT qualifies. Anything else would silently fall back to functorch, so it is refused
  unless ``allow_functorch=True``;
* no trainable module has buffers and no batch norm is in training mode anywhere (batch
  statistics mix examples, so "per-example gradient" stops meaning anything);
* the optimizer holds exactly the module's trainable parameters, none on the ``meta``
  device. Opacus issue #820 (DP + LoRA silently producing unusable models) came from
  hooks and optimizer holding parameter objects that PEFT/accelerate later replaced;
  identity checks catch that before any step is taken.

Frozen parameters get no hooks (Opacus only hooks modules with trainable parameters of
their own), no ``grad_sample`` and no noise; the regression test checks them bit for bit.

By default (``grid=True``, ``dp-noise = "grid"``) the release is float-safe:
:func:`fedtune.privacy.optimizer.sourced_dp_optimizer`, Opacus' ``DPOptimizer`` changed
to round each clipped example to a power-of-two grid, sum the integers exactly and add
an exact discrete Gaussian drawn from the keystream of a
:class:`~fedtune.privacy.noise.ChaChaNoise` (default: a fresh
:class:`~fedtune.privacy.noise.CsprngNoise`), whose ε the ``"discrete-rdp"`` accountant
proves. ``grid=False`` adds float64 Gaussian noise instead; ``docs/float-noise.md``.

Checking, wrapping and unwrapping stay in one module because they are one idea, the
Opacus wiring of one round: :func:`check_dp_compatible` refuses exactly what
``GradSampleModule`` / ``DPOptimizer`` would get silently wrong, and :func:`unwrap`
removes exactly what they leave behind.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedtune.data.collate import item_lengths
from fedtune.errors import UnsupportedLayerError
from fedtune.privacy._checks import check_positive, check_positive_int
from fedtune.privacy.noise import CsprngNoise, NoiseSource
from fedtune.privacy.optimizer import sourced_dp_optimizer
from fedtune.privacy.virtual import split_by_length

__all__ = [
    "DPTraining",
    "check_dp_compatible",
    "make_dp_training",
    "unwrap",
]


def check_dp_compatible(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    allow_functorch: bool = False,
) -> list[str]:
    """Check ``module`` (and ``optimizer``) for DP-SGD; return the trainable module names.

    Raises
    ------
    UnsupportedLayerError
        Naming the offending layer and what to do about it.
    """
    from opacus.grad_sample import GradSampleModule
    from opacus.utils.module_utils import trainable_modules

    supported = GradSampleModule.GRAD_SAMPLERS
    names = []
    for name, sub in trainable_modules(module):
        names.append(name)
        if type(sub) not in supported and not allow_functorch:
            kinds = ", ".join(sorted(t.__name__ for t in supported))
            raise UnsupportedLayerError(
                f"trainable layer `{name}` ({type(sub).__name__}) has no Opacus grad sampler. "
                f"Supported trainable layer types: {kinds}. Freeze it "
                "(requires_grad_(False)), leave it out of LoRA target_modules / "
                "modules_to_save, or pass allow_functorch=True to use Opacus' generic "
                "(slower, less tested) functorch path."
            )
        if any(True for _ in sub.buffers(recurse=False)):
            raise UnsupportedLayerError(
                f"trainable layer `{name}` ({type(sub).__name__}) has buffers, which would "
                "carry information about the batch outside DP-SGD. Freeze it or replace it."
            )
    if not names:
        raise UnsupportedLayerError("the model has no trainable parameters; nothing to train.")
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            raise UnsupportedLayerError(
                f"layer `{name}` ({type(sub).__name__}) normalises with batch statistics, which "
                "mixes examples and breaks per-example DP. Replace it with GroupNorm/LayerNorm "
                "(opacus.validators.ModuleValidator.fix) or put it in eval mode."
            )
    trainable = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    for n, p in module.named_parameters():
        if p.requires_grad and p.device.type == "meta":
            raise UnsupportedLayerError(
                f"trainable parameter `{n}` is on the meta device (not materialised). Move the "
                "model to its device *before* get_peft_model() and before building the optimizer."
            )
    if optimizer is not None:
        in_optimizer = {
            id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad
        }
        stray = in_optimizer - set(trainable)
        if stray:
            raise UnsupportedLayerError(
                f"the optimizer holds {len(stray)} trainable tensor(s) that are not parameters of "
                "the model (stale references, e.g. after PEFT wrapping or a device move: Opacus "
                "issue #820). Build the optimizer from the final model's parameters."
            )
        missing = sorted(n for i, n in trainable.items() if i not in in_optimizer)
        if missing:
            raise UnsupportedLayerError(
                f"trainable parameters missing from the optimizer: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}. Build the optimizer from "
                "[p for p in model.parameters() if p.requires_grad] or freeze them."
            )
    return names


@dataclass
class DPTraining:
    """The wrapped pieces for one round; call :meth:`close` when the round ends."""

    module: nn.Module
    """The ``GradSampleModule``; call it like the model (``module(**batch)``)."""
    optimizer: torch.optim.Optimizer
    """The ``DPOptimizer``: ``step()`` clips, noises, averages and updates."""
    data_loader: DataLoader
    """The ``DPDataLoader``: one pass = ``steps_per_epoch`` Poisson batches (may be empty)."""
    steps_per_epoch: int
    sample_rate: float
    expected_batch_size: int
    noise_multiplier: float
    max_grad_norm: float
    base_module: nn.Module
    """The unwrapped model (same parameter objects as :attr:`module`)."""

    def close(self) -> nn.Module:
        """Remove every Opacus hook and attribute; return the plain model for reuse."""
        return unwrap(self.module)


def unwrap(module: nn.Module) -> nn.Module:
    """Return the plain model inside a ``GradSampleModule`` with all Opacus traces removed.

    Opacus' own ``to_standard_module`` removes the hooks and ``grad_sample`` attributes
    but leaves ``DPOptimizer``'s ``summed_grad`` on parameters and captured
    ``activations`` / ``max_batch_len`` on layers of an interrupted step; those are
    removed too, so the next round can wrap the same model again. A model that is not
    wrapped is returned unchanged.
    """
    from opacus.grad_sample import GradSampleModule

    if not isinstance(module, GradSampleModule):
        return module
    base = module.to_standard_module()
    for p in base.parameters():
        for attr in ("summed_grad", "grad_sample", "_forward_counter", "_current_grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
    for sub in base.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in sub.__dict__:
                delattr(sub, attr)
    return base


def make_dp_training(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset | DataLoader,
    expected_batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator,
    noise: NoiseSource | None = None,
    noise_generator: torch.Generator | None = None,
    collate_fn: object | None = None,
    secure_mode: bool = False,
    allow_functorch: bool = False,
    canaries: Any = None,
    physical_batch_size: int = 0,
    grid: bool = True,
) -> DPTraining:
    """Wrap ``module``, ``optimizer`` and ``data`` for one round of DP-SGD.

    Parameters
    ----------
    module
        The model, in training mode, with only the parameters to train left trainable
        (e.g. a PEFT LoRA model). Its loss must be a mean over the batch.
    optimizer
        An optimizer over exactly ``module``'s trainable parameters.
    data
        The local training set, or a ``DataLoader`` over it (its dataset and
        ``collate_fn`` are reused; its batch size and sampler are replaced).
    expected_batch_size
        Mean Poisson batch size; ``sample_rate = expected_batch_size / len(dataset)``.
    noise_multiplier
        σ: noise std is ``σ · max_grad_norm`` per step.
    max_grad_norm
        ``C``: per-example gradient L2 clipping bound.
    generator
        Drives Poisson sampling only (unless the deprecated ``noise_generator`` /
        ``secure_mode`` path is taken, where it also drives the noise if
        ``noise_generator`` is not given).
    noise
        Source of the Gaussian noise (:mod:`fedtune.privacy.noise`). Default: a fresh
        :class:`~fedtune.privacy.noise.CsprngNoise` (OS-random key, float-safe).
        :class:`~fedtune.privacy.noise.SeededNoise` makes a simulation reproducible;
        never use it on real data.
    noise_generator
        Deprecated: draw the noise with Opacus' ``torch.normal(generator=...)`` instead
        (not cryptographic; float-unsafe unless ``secure_mode``). Use ``noise``.
    collate_fn
        Collate function for a bare dataset (default: torch's ``default_collate``).
    secure_mode
        Deprecated, with ``noise_generator``: Opacus' float-safe sum of four
        ``torch.normal`` draws from a (still non-cryptographic) torch generator.
    allow_functorch
        Accept trainable layers without a dedicated grad sampler.
    canaries
        Audits only: a :class:`fedtune.privacy.canaries.CanaryStep` whose drawn,
        included canaries join each step's per-example gradients, to be clipped and
        noised like any example (each slot drawn with the same ``q`` as every example).
    grid
        True (``dp-noise = "grid"``, the default): each clipped example is rounded to a
        power-of-two grid and the exact discrete Gaussian is added to the integer sum,
        a release whose ε ``"discrete-rdp"`` proves. False (``"float"``): float64
        Gaussian noise, accounted as the ideal continuous mechanism
        (``docs/float-noise.md``).
    physical_batch_size
        The most rows one forward/backward pass takes (0: no limit). A larger Poisson
        batch is sorted by length and split (:mod:`fedtune.privacy.virtual`); it is
        still one step, clipped per example and noised once. Lengths come from the
        dataset's ``lengths()`` when it has one.

    Returns
    -------
    DPTraining
        The wrapped module, optimizer and loader plus ``steps_per_epoch = int(1/q)``.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    sigma = check_positive("noise_multiplier", noise_multiplier)
    clip = check_positive("max_grad_norm", max_grad_norm)
    batch = check_positive_int("expected_batch_size", expected_batch_size)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
    legacy_noise = noise_generator is not None or secure_mode
    if noise is not None and legacy_noise:
        raise ValueError(
            "pass either `noise` (a NoiseSource) or the deprecated `noise_generator` / "
            "`secure_mode`, not both; `noise=CsprngNoise()` replaces them."
        )
    if noise is not None and not isinstance(noise, NoiseSource):
        raise ValueError(
            "`noise` must be a NoiseSource (e.g. fedtune.privacy.noise.CsprngNoise()), "
            f"got {type(noise).__name__}."
        )
    if isinstance(module, GradSampleModule) or hasattr(module, "autograd_grad_sample_hooks"):
        raise UnsupportedLayerError(
            "`module` already carries Opacus hooks; call close() on the previous round's "
            "DPTraining (or unwrap()) before wrapping it again."
        )
    if not module.training:
        raise UnsupportedLayerError("`module` is in eval mode; call module.train() first.")
    check_dp_compatible(module, optimizer, allow_functorch=allow_functorch)

    if isinstance(data, DataLoader):
        dataset = data.dataset
        collate_fn = data.collate_fn if collate_fn is None else collate_fn
    else:
        dataset = data
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("`data` is empty; there is nothing to train on.")
    if batch > n:
        raise ValueError(f"`expected_batch_size` ({batch}) exceeds the dataset size ({n}).")
    sample_rate = batch / n

    loader = DPDataLoader(
        dataset,
        sample_rate=sample_rate,
        collate_fn=collate_fn,  # type: ignore[arg-type]
        generator=generator,
    )
    # Opacus shapes an empty Poisson batch after the first non-empty one it collated, and
    # guesses (wrongly, for dict items) when the very first batch is empty. Collate one
    # real item up front so that an empty batch is the same dict with zero rows; the step
    # on it adds pure noise (fedtune.train), as the accounting assumes.
    wrapped = loader.collate_fn
    if getattr(wrapped, "first_batch", False) is None and hasattr(wrapped, "wrapped_collator_fn"):
        wrapped.first_batch = wrapped.wrapped_collator_fn([dataset[0]])  # type: ignore[index]
    gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=True)
    # Poisson batches must each be one optimizer step; as PrivacyEngine does, make a
    # second backward without step()/zero_grad() an error instead of a silent merge.
    gsm.forbid_grad_accumulation()
    dp_optimizer: DPOptimizer
    if legacy_noise:
        warnings.warn(
            "make_dp_training(noise_generator=..., secure_mode=...) draws the noise from a "
            "non-cryptographic torch.Generator; pass noise=CsprngNoise() (the default) or, "
            "for reproducible simulations only, noise=SeededNoise(seed).",
            DeprecationWarning,
            stacklevel=2,
        )
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            expected_batch_size=batch,
            loss_reduction="mean",
            generator=noise_generator if noise_generator is not None else generator,
            secure_mode=secure_mode,
        )
    else:
        dp_optimizer = sourced_dp_optimizer()(
            optimizer,
            noise=CsprngNoise() if noise is None else noise,
            grid=grid,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            expected_batch_size=batch,
            loss_reduction="mean",
        )
        dp_optimizer.canaries = canaries  # type: ignore[attr-defined]
        dp_optimizer.canary_rate = sample_rate  # type: ignore[attr-defined]
    if canaries is not None and legacy_noise:
        raise ValueError("`canaries` need the `noise` path, not `noise_generator`.")
    steps_per_epoch = len(loader)
    if physical_batch_size:
        loader = split_by_length(
            loader,
            max_batch_size=check_positive_int("physical_batch_size", physical_batch_size),
            optimizer=dp_optimizer,
            lengths=item_lengths(dataset),
        )
    return DPTraining(
        module=gsm,
        optimizer=dp_optimizer,
        data_loader=loader,
        steps_per_epoch=steps_per_epoch,
        sample_rate=sample_rate,
        expected_batch_size=batch,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        base_module=module,
    )
