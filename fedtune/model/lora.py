"""The LoRA adapter on a task's base model (PEFT), seeded so every client builds the same one.

``lora-variant = "ffa"`` freezes the ``A`` matrices at their seeded initialisation
(FFA-LoRA, Sun et al., ICLR 2024): only ``B`` trains and travels.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from torch import nn

from fedtune.config import ModelConfig
from fedtune.errors import ConfigError
from fedtune.model.loading import resolve_model_path, seeded
from fedtune.model.quantize import (
    check_quantization_backend,
    quantize_base,
    quiet_torchao_import,
    returning_freed_layers,
)
from fedtune.tasks import get_task

__all__ = ["build_model", "linear_module_names", "load_base_model"]


def load_base_model(
    cfg: ModelConfig, *, num_labels: int, seed: int, quantize: bool = False
) -> nn.Module:
    """The task's frozen base model (with a new ``num_labels`` head where it has one).

    ``quantize``: load it as ``base-quantization`` says, each layer quantised as it is
    read where the method allows (:func:`fedtune.model.quantize.quantized_load_kwargs`);
    finish with :func:`fedtune.model.quantize.quantize_base`. Default: the float base.
    """
    path = resolve_model_path(cfg)
    load = get_task(cfg.task).load_base_model
    if quantize and "quantization" in inspect.signature(load).parameters:
        return load(path, num_labels=num_labels, seed=seed, quantization=cfg.base_quantization)
    return load(path, num_labels=num_labels, seed=seed)  # a task without the hook: float


def linear_module_names(model: nn.Module) -> list[str]:
    names = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    return sorted(names)


def build_model(
    cfg: ModelConfig,
    *,
    num_labels: int,
    seed: int,
    quantize_for: torch.device | None = None,
) -> nn.Module:
    """Load the base model and wrap it with a LoRA adapter.

    Every client calls this with the run seed and gets bit-identical adapter and
    head initialisations, so round 1 needs no weights from the server.

    ``quantize_for``: the device a node trains on; the frozen base is then quantised
    as ``base-quantization`` says (:mod:`fedtune.model.quantize`; int8 as it loads)
    before PEFT wraps it.
    ``None`` (the layout, the export) keeps a float base: the adapter is the same.

    Raises
    ------
    ConfigError
        If a target module does not exist in the model (the message lists the
        linear layers the model has), or ``lora-layers`` names a block it lacks.
    """
    with quiet_torchao_import():  # peft imports torchao when it is installed
        from peft import LoraConfig, TaskType, get_peft_model

    task = get_task(cfg.task)
    if quantize_for is not None:  # refuse before loading anything
        check_quantization_backend(
            cfg.base_quantization, cuda=torch.device(quantize_for).type == "cuda"
        )
    quantize = quantize_for is not None and cfg.base_quantization != "none"
    with returning_freed_layers() if quantize else contextlib.nullcontext():
        base = load_base_model(cfg, num_labels=num_labels, seed=seed, quantize=quantize)
        if quantize_for is not None:
            quantize_base(base, cfg.base_quantization, device=str(quantize_for))
    available = linear_module_names(base)
    missing = [m for m in cfg.target_modules if m not in available]
    if missing:
        raise ConfigError(
            f"`lora-target-modules` names {', '.join(repr(m) for m in missing)}, which "
            f"the model does not have; its linear layers are: {', '.join(available)}."
        )
    layers = cfg.layers
    if layers is not None:
        blocks = int(getattr(getattr(base, "config", None), "num_hidden_layers", 0) or 0)
        if blocks and layers[-1] >= blocks:
            raise ConfigError(
                f"`lora-layers` is {cfg.lora_layers!r}, but the model has {blocks} blocks "
                f"(0-{blocks - 1})."
            )
    lora = LoraConfig(
        task_type=TaskType[task.peft_task_type],
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        layers_to_transform=layers,
    )
    with seeded(seed + 1), warnings.catch_warnings(), quiet_torchao_import():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft
        # fedtune never merges the adapter into a quantised base, which is all this warns of.
        warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated", UserWarning)
        model = get_peft_model(base, lora)
    if cfg.lora_variant == "ffa":
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model
