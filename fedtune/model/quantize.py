"""A quantised frozen base (``base-quantization``): fewer bytes per frozen weight, same adapter.

LoRA trains ``B A`` beside a frozen ``W_0`` (``W_0 x + (alpha / r) B A x``); nothing
requires ``W_0`` in 32 bits. Storing it in fewer bits shrinks the largest part of a
node's memory while the adapter, DP-SGD's per-sample gradients (Opacus hooks only the
trainable ``lora_A`` / ``lora_B`` ``nn.Linear`` layers) and the payload keep their
format, so the exported adapter loads with stock PEFT on the unquantised base.

- ``"int8"``: weight-only int8, one scale per output channel, with torchao's
  ``Int8WeightOnlyConfig`` (CPU and GPU). PEFT wraps such layers in its
  ``TorchaoLoraLinear``. The layers become :class:`Int8FrozenLinear`: through torchao
  alone, autograd saves each layer's de-quantised float32 weight for the backward pass
  (measured: a training step then holds the whole float32 body again), so the backward
  pass here re-de-quantises the int8 weight instead, one layer at a time, as
  bitsandbytes does for 4-bit weights.
- ``"nf4"``: 4-bit NormalFloat with bitsandbytes' ``Linear4bit`` on CUDA, as QLoRA
  (Dettmers et al., https://arxiv.org/abs/2305.14314). The weights are quantised when
  the layer moves to the GPU; PEFT wraps them in its ``Linear4bit`` LoRA layer.

Only the linear layers of the frozen body are quantised: a classification head
(``classifier`` / ``score``) trains and stays in float, and an output projection that
shares its weight with the input embedding is left alone (quantising it would replace
the embedding too). The base is quantised after it is loaded in float32, so a node's
peak memory while loading is still the float32 size (docs/scale.md measures both).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fedtune.config.model import BaseQuantization
from fedtune.model.loading import ModelError

__all__ = [
    "HEAD_NAMES",
    "Int8FrozenLinear",
    "check_quantization_backend",
    "quantizable_linears",
    "quantize_base",
    "quiet_torchao_import",
]

#: Trainable heads (``modules_to_save`` in PEFT's sequence-classification task): never quantised.
HEAD_NAMES = frozenset({"classifier", "score"})


def check_quantization_backend(method: BaseQuantization, *, cuda: bool | None = None) -> None:
    """Refuse, in one line naming the key and value, a method this machine cannot run.

    ``cuda``: whether a CUDA device will be used (default: whether one is available).

    Raises
    ------
    ModelError
        ``"nf4"`` without CUDA or without bitsandbytes; ``"int8"`` without torchao.
    """
    if method == "none":
        return
    if method == "int8":
        if importlib.util.find_spec("torchao") is None:
            raise ModelError(
                "`base-quantization` is 'int8', which needs the torchao package: "
                "`pip install --no-deps torchao==0.18.0` (a fedtune dependency), or use 'none'."
            )
        return
    if method == "nf4":
        has_cuda = torch.cuda.is_available() if cuda is None else cuda
        if not has_cuda:
            raise ModelError(
                "`base-quantization` is 'nf4', which needs a CUDA GPU (bitsandbytes 4-bit); "
                "this machine has none: use 'int8' (torchao, runs on CPU) or 'none'."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(
                "`base-quantization` is 'nf4', which needs the bitsandbytes package: "
                "`pip install -e '.[cuda]'` (bitsandbytes==0.50.2), or use 'int8'."
            )
        return
    raise ModelError(
        f"`base-quantization` must be one of none, int8, nf4, got {method!r}."
    )  # pragma: no cover - ModelConfig checked it already


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the frozen-body ``nn.Linear`` layers that ``quantize_base`` converts."""
    tied: set[int] = set()
    embeddings = getattr(model, "get_input_embeddings", None)
    if callable(embeddings):
        emb = embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            tied.add(id(emb.weight))
    out = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        parts = name.split(".")
        if HEAD_NAMES.intersection(parts) or id(mod.weight) in tied:
            continue
        out.append(name)
    return out


def quantize_base(model: nn.Module, method: BaseQuantization, *, device: str = "cuda") -> nn.Module:
    """Quantise the frozen body of ``model`` in place (before PEFT wraps it) and return it.

    Every parameter of the body stays frozen (``requires_grad = False``); PEFT then adds
    float LoRA layers beside the quantised weights. ``device`` is where an ``"nf4"``
    model goes (bitsandbytes quantises on the move); ``"int8"`` stays where it is.

    Raises
    ------
    ModelError
        As :func:`check_quantization_backend`, or if the model has no linear layer to
        quantise.
    """
    if method == "none":
        return model
    check_quantization_backend(method, cuda=torch.device(device).type == "cuda")
    names = set(quantizable_linears(model))
    if not names:
        raise ModelError(
            f"`base-quantization` is {method!r}, but the base model has no frozen linear "
            "layer to quantise; use 'none'."
        )
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] in names:
            param.requires_grad_(False)
    if method == "int8":
        _int8(model, names)
    else:
        _nf4(model, names, device=device)
    return model


@contextlib.contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """torchao logs a warning per CUDA-only kernel library it cannot load on a CPU build.

    PEFT imports torchao whenever it is installed (``get_peft_model`` asks every layer
    whether its weight is a torchao tensor), so this wraps that call too.
    """
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _FrozenInt8Matmul(torch.autograd.Function):
    """``y = x W^T + b`` with a frozen int8 ``W``: saves no float copy of ``W``.

    The gradient with respect to ``x`` is ``dy W``; ``W`` is de-quantised again in the
    backward pass (one layer's float weight alive at a time). ``W`` and ``b`` are frozen:
    no gradient for them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.weight = weight  # the module's own parameter: a reference, not a copy
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        weight = ctx.weight.dequantize().to(grad.dtype)
        return grad @ weight, None, None


class Int8FrozenLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is a torchao int8 tensor (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return nn.functional.linear(x, self.weight, self.bias)
        out: torch.Tensor = _FrozenInt8Matmul.apply(x, self.weight, self.bias)
        return out


def _int8(model: nn.Module, names: set[str]) -> None:
    with quiet_torchao_import():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda _m, fqn: fqn in names)
    for name, module in model.named_modules():
        if name in names:
            module.__class__ = Int8FrozenLinear  # same state, a backward that saves int8 only


def _nf4(model: nn.Module, names: set[str], *, device: str) -> None:
    import bitsandbytes as bnb  # CUDA-only optional dependency

    modules = dict(model.named_modules())
    for name in sorted(names):
        old = modules[name]
        assert isinstance(old, nn.Linear)  # quantizable_linears picked nn.Linear only
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=old.weight.dtype,
            quant_type="nf4",
        )
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    model.to(device)  # Params4bit quantises to NF4 here
