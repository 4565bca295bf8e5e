"""Model loading errors, seeded adapters and the adapter <-> flat vector round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune import model as fmodel
from fedtune.config import ConfigError, ModelConfig


def test_flatten_unflatten_round_trip(tiny_model_dir: Path) -> None:
    model = fmodel.build_model(ModelConfig(model_path=str(tiny_model_dir)), num_labels=3, seed=0)
    layout = fmodel.adapter_layout(model)
    vec = fmodel.get_adapter_vector(model)
    assert vec.shape == (layout.size,)
    tensors = fmodel.unflatten(vec, layout)
    assert list(tensors) == list(layout.names)
    np.testing.assert_array_equal(fmodel.flatten(tensors, layout), vec)
    new = np.random.default_rng(0).normal(size=layout.size)
    fmodel.set_adapter_vector(model, new)
    np.testing.assert_allclose(fmodel.get_adapter_vector(model), new.astype(np.float32), rtol=1e-6)
    with pytest.raises(fmodel.ModelError, match=r"shape \(3,\), expected"):
        fmodel.unflatten(np.zeros(3), layout)


def test_only_lora_and_head_travel_and_ffa_freezes_a(tiny_model_dir: Path) -> None:
    std = fmodel.build_model(ModelConfig(model_path=str(tiny_model_dir)), num_labels=3, seed=0)
    names = fmodel.adapter_layout(std).names
    assert names and all(".lora_A." in n or ".lora_B." in n or "classifier" in n for n in names)
    ffa = fmodel.build_model(
        ModelConfig(model_path=str(tiny_model_dir), lora_variant="ffa"), num_labels=3, seed=0
    )
    ffa_names = fmodel.adapter_layout(ffa).names
    assert not any(".lora_A." in n for n in ffa_names)
    assert set(ffa_names) == {n for n in names if ".lora_A." not in n}


def test_same_seed_same_adapter_and_head(tiny_model_dir: Path) -> None:
    cfg = ModelConfig(model_path=str(tiny_model_dir))
    a = fmodel.build_model(cfg, num_labels=3, seed=5)
    b = fmodel.build_model(cfg, num_labels=3, seed=5)
    c = fmodel.build_model(cfg, num_labels=3, seed=6)
    np.testing.assert_array_equal(fmodel.get_adapter_vector(a), fmodel.get_adapter_vector(b))
    assert not np.array_equal(fmodel.get_adapter_vector(a), fmodel.get_adapter_vector(c))
    state = torch.get_rng_state()
    fmodel.build_model(cfg, num_labels=3, seed=5)
    assert torch.equal(state, torch.get_rng_state()), "seeding must not leak into the caller"


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"`model-path` must be a local Hugging Face model directory, got '/no/model'",
    ):
        fmodel.resolve_model_path(ModelConfig(model_path="/no/model"))
    with pytest.raises(ConfigError, match=r"has no config.json"):
        fmodel.resolve_model_path(ModelConfig(model_path=str(tmp_path)))


def test_missing_target_module_lists_available_layers(tiny_model_dir: Path) -> None:
    cfg = ModelConfig(model_path=str(tiny_model_dir), lora_target_modules="query,q_proj")
    with pytest.raises(
        ConfigError,
        match=r"names 'q_proj', which the model does not have; its linear layers are: .*query",
    ):
        fmodel.build_model(cfg, num_labels=3, seed=0)


def test_default_model_is_the_bundled_minilm() -> None:
    path = fmodel.resolve_model_path(ModelConfig())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_lora_layers_adapt_only_the_named_blocks(tiny_model_dir: Path) -> None:
    # The tiny BERT has 2 blocks: an adapter on block 1 only, and errors naming the key.
    top = fmodel.build_model(
        ModelConfig(model_path=str(tiny_model_dir), lora_layers="1"), num_labels=3, seed=0
    )
    lora = [n for n in fmodel.adapter_layout(top).names if ".lora_" in n]
    assert lora and all(".layer.1." in n for n in lora)
    assert ModelConfig(lora_layers="20-22, 25").layers == [20, 21, 22, 25]
    assert ModelConfig().layers is None
    with pytest.raises(ConfigError, match=r"the model has 2 blocks \(0-1\)"):
        fmodel.build_model(
            ModelConfig(model_path=str(tiny_model_dir), lora_layers="1-2"), num_labels=3, seed=0
        )
    for bad in ("top", "5-3", "-1"):
        with pytest.raises(ConfigError, match=rf"`lora-layers` is '{bad}'"):
            ModelConfig(lora_layers=bad)
