"""The model a client trains: the task's base model, its LoRA adapter, the flat vector.

``loading`` finds the base model and tokenizer, ``lora`` wraps it with PEFT,
``adapter`` maps the trainable tensors to the one flat vector that travels.
"""

from __future__ import annotations

from fedtune.errors import ModelError
from fedtune.model.adapter import (
    AdapterLayout,
    adapter_layout,
    flatten,
    get_adapter_vector,
    set_adapter_vector,
    unflatten,
)
from fedtune.model.loading import (
    DEFAULT_MODEL_PACKAGE,
    default_model_path,
    load_tokenizer,
    resolve_model_path,
    seeded,
)
from fedtune.model.lora import build_model, linear_module_names, load_base_model
from fedtune.model.quantize import check_quantization_backend, quantize_base

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "AdapterLayout",
    "ModelError",
    "adapter_layout",
    "build_model",
    "check_quantization_backend",
    "default_model_path",
    "flatten",
    "get_adapter_vector",
    "linear_module_names",
    "load_base_model",
    "load_tokenizer",
    "quantize_base",
    "resolve_model_path",
    "seeded",
    "set_adapter_vector",
    "unflatten",
]
