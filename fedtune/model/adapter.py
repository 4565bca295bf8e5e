"""The adapter <-> flat vector mapping: what travels, in which order.

Only the trainable adapter tensors (LoRA ``A``/``B`` and a classification head)
ever leave a client. They are flattened in a fixed, named order described by an
:class:`AdapterLayout`, so every party agrees on which slot of the flat vector
belongs to which weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedtune.errors import ModelError

__all__ = [
    "AdapterLayout",
    "adapter_layout",
    "flatten",
    "get_adapter_vector",
    "set_adapter_vector",
    "unflatten",
]


@dataclass(frozen=True)
class AdapterLayout:
    """Names and shapes of the travelling tensors, in flattening order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of values in each tensor."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return int(sum(self.sizes))

    def to_dict(self) -> dict[str, list[object]]:
        """Plain-type form for JSON."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}


def adapter_layout(model: nn.Module) -> AdapterLayout:
    """The layout of ``model``'s trainable tensors, in ``named_parameters`` order."""
    items = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    return AdapterLayout(names=tuple(n for n, _ in items), shapes=tuple(s for _, s in items))


def get_adapter_vector(model: nn.Module) -> NDArray[np.float64]:
    """Flatten the trainable tensors into one float64 vector."""
    parts = [
        p.detach().to("cpu", torch.float64).reshape(-1).numpy()
        for _, p in model.named_parameters()
        if p.requires_grad
    ]
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(parts)


def unflatten(
    vector: NDArray[np.floating], layout: AdapterLayout
) -> dict[str, NDArray[np.float64]]:
    """Split a flat vector back into named tensors."""
    if vector.ndim != 1 or vector.shape[0] != layout.size:
        raise ModelError(
            f"Adapter vector has shape {vector.shape}, expected ({layout.size},) for this "
            "model and LoRA configuration."
        )
    out: dict[str, NDArray[np.float64]] = {}
    offset = 0
    for name, shape, size in zip(layout.names, layout.shapes, layout.sizes, strict=True):
        out[name] = np.asarray(vector[offset : offset + size], dtype=np.float64).reshape(shape)
        offset += size
    return out


def flatten(tensors: dict[str, NDArray[np.floating]], layout: AdapterLayout) -> NDArray[np.float64]:
    """Inverse of :func:`unflatten`: concatenate named tensors in layout order."""
    missing = [n for n in layout.names if n not in tensors]
    if missing:
        raise ModelError(f"Adapter tensors missing from the update: {missing[:3]}.")
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if tuple(tensors[name].shape) != shape:
            raise ModelError(
                f"Adapter tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}."
            )
    if not layout.names:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(
        [np.asarray(tensors[n], dtype=np.float64).reshape(-1) for n in layout.names]
    )


def set_adapter_vector(model: nn.Module, vector: NDArray[np.floating]) -> None:
    """Load a flat vector into the model's trainable tensors (in place)."""
    layout = adapter_layout(model)
    tensors = unflatten(np.asarray(vector), layout)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            param = params[name]
            param.copy_(torch.from_numpy(value).to(device=param.device, dtype=param.dtype))
