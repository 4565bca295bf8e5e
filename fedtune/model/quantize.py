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
the embedding too).

Loading: ``"int8"`` quantises each linear layer as it is loaded
(:func:`quantized_load_kwargs`: transformers' ``TorchAoConfig`` at ``from_pretrained``,
which builds the model on the meta device and quantises each weight right after it is
read), so a node never holds the float32 body; :func:`quantize_base` then converts
whatever the task's loader left in float (a loader without the hook: all of it, after a
float32 load). Both give the same int8 tensors (tested). ``"nf4"`` loads in float32
and quantises as the layers move to the GPU (the GPU never holds the float body; the
host does, once). docs/scale.md measures the peaks.
"""

from __future__ import annotations

import contextlib
import ctypes
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
    "quantized_load_kwargs",
    "returning_freed_layers",
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


def quantized_load_kwargs(method: BaseQuantization) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that quantise each layer as it is loaded.

    ``"int8"``: a ``TorchAoConfig`` with the same int8 weight-only config as
    :func:`quantize_base`, skipping trainable heads (``classifier`` / ``score`` at any
    depth). transformers never reads a tied output projection from the checkpoint (it
    ties it to the embedding afterwards), so it stays float, as :func:`quantizable_linears`
    wants. Other methods: no argument (the float32 load; :func:`quantize_base` after it).
    Pass the loaded model to :func:`quantize_base` all the same: it checks the result
    and converts the rest.
    """
    if method != "int8":
        return {}
    check_quantization_backend(method)
    with quiet_torchao_import():
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

    heads = "|".join(sorted(HEAD_NAMES))
    skip = [rf"(?:.*\.)?(?:{heads})"]  # transformers matches these from the name's start
    return {
        "quantization_config": TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    }


def quantize_base(model: nn.Module, method: BaseQuantization, *, device: str = "cuda") -> nn.Module:
    """Quantise the frozen body of ``model`` in place (before PEFT wraps it) and return it.

    Every parameter of the body stays frozen (``requires_grad = False``); PEFT then adds
    float LoRA layers beside the quantised weights. ``device`` is where an ``"nf4"``
    model goes (bitsandbytes quantises on the move); ``"int8"`` stays where it is.
    Layers already quantised while loading (:func:`quantized_load_kwargs`) are kept.

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
    _check_loaded(model, names)
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] in names:
            param.requires_grad_(False)
    if method == "int8":
        _int8(model, names)
    else:
        _nf4(model, names, device=device)
    return model


#: glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h).
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for its dynamic mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``).
_MMAP_THRESHOLD_MAX = 32 << 20


@contextlib.contextmanager
def returning_freed_layers() -> Iterator[None]:
    """While loading: glibc serves allocations of 1 MiB and more with ``mmap``, so each
    float32 layer freed after quantisation goes back to the OS at once.

    Without it, glibc's dynamic threshold (raised up to 32 MiB by the first freed large
    block) puts the per-layer float32 copies on the heap, where they stay resident as
    fragments: measured at 360M, quantising while loading then peaked at 1.9-2.3 GiB of
    anonymous memory, no better than quantising after a float32 load (2.0); with it, 0.8 GiB
    (docs/scale.md). On exit the threshold is set to glibc's dynamic ceiling (what a
    long-running process converges to) and freed heap memory is trimmed. A no-op
    where the C library is not glibc.
    """
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


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


def _is_torchao(weight: object) -> bool:
    return type(weight).__module__.startswith("torchao")


def _check_loaded(model: nn.Module, names: set[str]) -> None:
    """Undo what ``from_pretrained`` records of a quantised load; refuse a wrong layer.

    A layer quantised while loading must be one :func:`quantizable_linears` picks (not a
    head, not a tied output): a checkpoint that still carries a tied copy would otherwise
    leave an int8 output projection beside a float embedding.
    """
    wrong = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name not in names and _is_torchao(mod.weight)
    ]
    if wrong:
        raise ModelError(
            f"`base-quantization`: the loader quantised {', '.join(wrong[:3])}, which must "
            "stay float (a trainable head or an output tied to the embedding); load this "
            "model with 'none' or report the checkpoint."
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # fedtune owns the layers from here; nothing else may see a
        quantizer.remove_quantization_config(model)  # "quantized model" (saving, merging)


def _int8(model: nn.Module, names: set[str]) -> None:
    with quiet_torchao_import():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

    modules = dict(model.named_modules())
    todo = {n for n in names if not _is_torchao(modules[n].weight)}
    if todo:
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda _m, fqn: fqn in todo)
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
