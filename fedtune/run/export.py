"""Write and reload the final adapter in standard PEFT format.

``adapter/`` holds ``adapter_config.json`` and ``adapter_model.safetensors`` as
written by PEFT's own ``save_pretrained`` (the classification head is saved as a
``modules_to_save`` module), plus ``fedtune.json`` with the label names and the
round the adapter comes from. Stock ``peft.PeftModel.from_pretrained`` loads it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from torch import nn

from fedtune.aggregation import WeightedSum
from fedtune.config import ConfigError, RunConfig
from fedtune.model import adapter_layout, build_model, load_base_model, set_adapter_vector
from fedtune.model.quantize import quiet_torchao_import
from fedtune.run.checkpoint import load_checkpoint
from fedtune.secure import run_codec


def write_adapter(
    out_dir: Path, cfg: RunConfig, vector: NDArray[np.floating], *, round_: int
) -> Path:
    """Build the model, load ``vector`` into its adapter and save it with PEFT."""
    labels = cfg.data.labels
    model = build_model(cfg.model, num_labels=len(labels), seed=cfg.federation.seed)
    set_adapter_vector(model, vector)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))  # type: ignore[operator]
    meta = {"label-names": labels, "round": round_, "lora-variant": cfg.model.lora_variant}
    (out_dir / "fedtune.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir


def load_adapter(adapter_dir: Path, cfg: RunConfig) -> nn.Module:
    """Base model + adapter through stock ``peft.PeftModel.from_pretrained``."""
    with quiet_torchao_import():  # peft imports torchao when it is installed
        from peft import PeftModel  # noqa: PLC0415

    labels = json.loads((adapter_dir / "fedtune.json").read_text())["label-names"]
    # Another seed for the base head on purpose: the adapter must bring its own head.
    base = load_base_model(cfg.model, num_labels=len(labels), seed=cfg.federation.seed + 7919)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft
        return PeftModel.from_pretrained(base, str(adapter_dir))


def export_adapter(
    run_dir: Path, cfg: RunConfig, *, secret_context: Path | None, out_dir: Path | None = None
) -> Path:
    """Decode ``run_dir/checkpoint`` (decrypting with ``secret_context`` if encrypted)
    and write the PEFT adapter to ``out_dir`` (default ``run_dir/adapter``)."""
    checkpoint = load_checkpoint(run_dir / "checkpoint")
    layout = adapter_layout(
        build_model(cfg.model, num_labels=len(cfg.data.labels), seed=cfg.federation.seed)
    )
    if cfg.crypto.encryption and secret_context is None:
        raise ConfigError(f"{str(run_dir)!r} is encrypted: pass the secret context (--key).")
    secret = secret_context if cfg.crypto.encryption else None
    codec = run_codec(cfg.crypto.encryption_backend, length=layout.size, context=secret)
    payload = codec.validate(checkpoint.payload, aggregate=True)
    vector = WeightedSum(total=codec.decode(payload), num_examples=checkpoint.num_examples).mean()
    return write_adapter(out_dir or run_dir / "adapter", cfg, vector, round_=checkpoint.round)
