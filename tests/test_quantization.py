"""``base-quantization``: an int8 frozen base trains (with and without DP-SGD), its adapter
loads with stock PEFT on the float base, and NF4 is refused cleanly without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config import ModelConfig, TrainConfig, parse_run_config
from fedtune.config._checks import ConfigError
from fedtune.model import (
    ModelError,
    adapter_layout,
    build_model,
    check_quantization_backend,
    get_adapter_vector,
    load_base_model,
    set_adapter_vector,
)
from tests.conftest import lora_llama_config

CPU = torch.device("cpu")


def _cfg(model_dir: Path, quantization: str = "int8") -> ModelConfig:
    return lora_llama_config(model_dir, quantization)


def _rows(vocab: int, n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, length), generator=gen)
    return [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}
        for row in ids
    ]


def _int8_model(model_dir: Path) -> torch.nn.Module:
    return build_model(_cfg(model_dir), num_labels=0, seed=0, quantize_for=CPU)


def test_int8_base_is_int8_and_frozen_with_an_unchanged_layout(tiny_llama_dir: Path) -> None:
    from torchao.quantization import Int8Tensor

    model = _int8_model(tiny_llama_dir)
    float_model = build_model(_cfg(tiny_llama_dir), num_labels=0, seed=0)
    q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert type(q_proj).__name__ == "TorchaoLoraLinear"
    weight = q_proj.base_layer.weight
    assert isinstance(weight, Int8Tensor) and weight.qdata.dtype == torch.int8
    assert not weight.requires_grad
    up = model.get_submodule("base_model.model.model.layers.1.mlp.up_proj").weight
    assert isinstance(up, Int8Tensor) and not up.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # The tied output projection shares the embedding: left in float.
    assert not isinstance(model.get_submodule("base_model.model.lm_head").weight, Int8Tensor)
    # What travels is the same: names, shapes and the seeded initial values.
    assert adapter_layout(model) == adapter_layout(float_model)
    np.testing.assert_array_equal(get_adapter_vector(model), get_adapter_vector(float_model))


def test_int8_base_trains_without_dp(tiny_llama_dir: Path) -> None:
    from torch.utils.data import DataLoader

    from fedtune.train.loop import train_local

    model = _int8_model(tiny_llama_dir)
    before = get_adapter_vector(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    loader = DataLoader(_rows(vocab), batch_size=4)  # type: ignore[arg-type]
    result = train_local(model, loader, TrainConfig(learning_rate=0.01), device=CPU)
    assert result.steps == 4 and np.isfinite(result.loss)
    assert np.abs(get_adapter_vector(model) - before).max() > 0
    weight = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").base_layer
    assert weight.weight.qdata.dtype == torch.int8


def test_int8_base_trains_with_dp_sgd_per_sample_gradients(tiny_llama_dir: Path) -> None:
    from fedtune.privacy.dpsgd import make_dp_training
    from fedtune.privacy.noise import SeededNoise

    model = _int8_model(tiny_llama_dir)
    model.train()
    before = get_adapter_vector(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    dp = make_dp_training(
        module=model,
        optimizer=torch.optim.SGD(params, lr=0.05),
        data=_rows(vocab),  # type: ignore[arg-type]
        expected_batch_size=4,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(1),
        noise=SeededNoise(2),
    )
    losses = []
    for batch in dp.data_loader:
        if len(batch["labels"]) == 0:
            continue
        dp.optimizer.zero_grad(set_to_none=True)
        loss = dp.module(**batch).loss
        loss.backward()
        # Opacus computed one gradient per example for every LoRA tensor, none for the base.
        for p in params:
            assert p.grad_sample.shape == (len(batch["labels"]), *p.shape)
        dp.optimizer.step()
        losses.append(float(loss.detach()))
        if len(losses) == 2:
            break
    dp.close()
    assert losses and all(np.isfinite(losses))
    assert np.abs(get_adapter_vector(model) - before).max() > 0
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and ".lora_" in n]
    assert not frozen


def test_int8_adapter_loads_with_stock_peft_on_the_float_base(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    model = _int8_model(tiny_llama_dir)
    rng = np.random.default_rng(0)
    trained = rng.normal(0, 0.05, adapter_layout(model).size)
    set_adapter_vector(model, trained)
    model.save_pretrained(str(tmp_path / "adapter"))  # type: ignore[operator]

    base = load_base_model(_cfg(tiny_llama_dir, "none"), num_labels=0, seed=7)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    state = {n: p.detach().numpy() for n, p in loaded.named_parameters() if ".lora_" in n}
    mine = {n: p.detach().numpy() for n, p in model.named_parameters() if ".lora_" in n}
    assert state.keys() == mine.keys()
    for name, value in mine.items():
        np.testing.assert_array_equal(state[name], value)
    # Same function up to the int8 rounding of the frozen weights.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a = model.eval()(input_ids=ids).logits
        b = loaded.eval()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=0.05), float((a - b).abs().max())


def test_int8_classification_head_stays_float_and_trainable(tiny_model_dir: Path) -> None:
    from torchao.quantization import Int8Tensor

    cfg = ModelConfig(model_path=str(tiny_model_dir), base_quantization="int8")
    model = build_model(cfg, num_labels=3, seed=0, quantize_for=CPU)
    query = model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    assert isinstance(query.base_layer.weight, Int8Tensor)
    head = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert head and not any(isinstance(p, Int8Tensor) for p in head)


def test_nf4_is_refused_without_cuda_in_one_line(tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"`base-quantization` is 'nf4', which needs a CUDA GPU"):
        check_quantization_backend("nf4", cuda=False)
    with pytest.raises(ModelError, match=r"`base-quantization` is 'nf4'.*use 'int8'") as err:
        build_model(_cfg(tiny_llama_dir, "nf4"), num_labels=0, seed=0, quantize_for=CPU)
    assert "\n" not in str(err.value)
    # The simulation's preflight refuses it before any process starts.
    from fedtune.apps.simulation.driver import preflight

    cfg = parse_run_config({"base-quantization": "nf4", "device": "cpu"})
    with pytest.raises(ModelError, match=r"`base-quantization` is 'nf4'"):
        preflight(cfg)
    # Without quantize_for (the server's layout, the export) the float base is built.
    assert adapter_layout(build_model(_cfg(tiny_llama_dir, "nf4"), num_labels=0, seed=0)).size


def test_unknown_quantization_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"`base-quantization` must be one of none, int8, nf4"):
        ModelConfig(base_quantization="int4")  # type: ignore[arg-type]


def test_int8_layer_keeps_no_float_weight_for_backward_and_matches_float_gradients() -> None:
    """Through torchao alone autograd saves each layer's de-quantised float32 weight (the
    whole float body again during a step); Int8FrozenLinear saves nothing for it."""
    from fedtune.model.quantize import Int8FrozenLinear, quantize_base

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
    quantize_base(model, "int8", device="cpu")
    assert all(type(m) is Int8FrozenLinear for m in model)
    x = torch.randn(3, 64, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    assert (128, 64) not in saved and (8, 128) not in saved
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    hidden = torch.nn.functional.linear(ref_x, model[0].weight.dequantize(), model[0].bias)
    ref = torch.nn.functional.linear(hidden, model[1].weight.dequantize(), model[1].bias)
    ref.sum().backward()
    torch.testing.assert_close(out.detach(), ref.detach())
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_int8_is_quantised_while_loading_into_the_same_tensors(tiny_llama_dir: Path) -> None:
    """The loader quantises each layer as it reads it (no float32 body in memory); the
    result equals the float32 load quantised afterwards, bit for bit."""
    from torchao.quantization import Int8Tensor

    from fedtune.model.quantize import Int8FrozenLinear, quantizable_linears, quantize_base

    cfg = _cfg(tiny_llama_dir)
    at_load = load_base_model(cfg, num_labels=0, seed=0, quantize=True)
    q_proj = at_load.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj.weight, Int8Tensor)  # already int8 before quantize_base
    # The tied output projection is never read from the checkpoint: float, still tied.
    assert at_load.get_submodule("lm_head").weight is at_load.get_input_embeddings().weight
    quantize_base(at_load, "int8", device="cpu")
    assert getattr(at_load, "hf_quantizer", None) is None
    assert getattr(at_load.config, "quantization_config", None) is None
    post = load_base_model(cfg, num_labels=0, seed=0)
    names = quantizable_linears(post)  # the float layers it converts
    quantize_base(post, "int8", device="cpu")
    assert len(names) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for name in names:
        a, b = at_load.get_submodule(name), post.get_submodule(name)
        assert type(a) is Int8FrozenLinear and type(b) is Int8FrozenLinear
        assert torch.equal(a.weight.qdata, b.weight.qdata)
        assert torch.equal(a.weight.scale, b.weight.scale)


def test_a_head_quantised_by_a_loader_is_refused() -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from fedtune.model.quantize import quantize_base

    model = torch.nn.Module()
    model.body = torch.nn.Linear(8, 8)
    model.score = torch.nn.Linear(8, 2)
    quantize_(model, Int8WeightOnlyConfig())  # a loader that quantised the head too
    with pytest.raises(ModelError, match=r"the loader quantised score, which must stay float"):
        quantize_base(model, "int8", device="cpu")


#: A layer of float32 weights freed while a smaller allocation (its int8 copy) lives above
#: it, with glibc's malloc called directly in a fresh process; prints the bytes the free gave
#: back to the OS. ``sys.argv[1]``: ``outside``, ``inside`` or ``after`` the context.
FREED_LAYER_PROBE = """
import contextlib, ctypes, os, sys
from fedtune.model.quantize import returning_freed_layers
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
def touched(size):
    p = libc.malloc(size)
    libc.memset(p, 1, size)
    return p
libc.free(touched(16 << 20))  # glibc's first large free raises its dynamic mmap threshold
if sys.argv[1] == "after":
    with returning_freed_layers():
        pass
with returning_freed_layers() if sys.argv[1] == "inside" else contextlib.nullcontext():
    layer = touched(4 << 20)
    touched(256 << 10)  # the small copy above it, kept
    before = rss()
    libc.free(layer)
    print(before - rss())
"""


def test_a_layer_freed_while_loading_goes_back_to_the_os_at_once() -> None:
    import subprocess
    import sys

    def returned(where: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", FREED_LAYER_PROBE, where],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return int(done.stdout)

    mib = 1 << 20
    # glibc as it runs: the 4 MiB block sits on the heap under the kept one and stays resident
    assert returned("outside") < mib
    # inside: served by mmap, returned whole on free
    assert returned("inside") >= 4 * mib - 64 * 1024
    # after: the loader's setting does not outlive it (glibc's ceiling, the heap again)
    assert returned("after") < mib
