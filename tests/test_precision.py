"""Memory savers that must leave the DP release unchanged: bf16 autocast, padding width.

``precision = "bf16"`` runs the forward pass under ``torch.autocast``; Opacus' hooks then
return bfloat16 per-example gradients, and the clipping bound must still hold on the
values that are summed (norms in float32 or float64, never in bfloat16). Padding each
batch to its longest row instead of ``max-seq-length`` changes shapes only: each
example's gradient, hence what is clipped, summed and noised, is the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config import ConfigError, ModelConfig, TrainConfig
from fedtune.data.collate import IGNORE, pad_collate
from fedtune.model import build_model, get_adapter_vector
from fedtune.privacy.dpsgd import make_dp_training
from fedtune.privacy.noise import SeededNoise
from fedtune.privacy.optimizer import sourced_dp_optimizer
from fedtune.train.loop import compute_precision, train_local
from tests.conftest import lora_llama_config

CPU = torch.device("cpu")


def _cfg(model_dir: Path, quantization: str = "none") -> ModelConfig:
    return lora_llama_config(model_dir, quantization)


def _ragged(vocab: int, n: int = 12) -> list[dict[str, torch.Tensor]]:
    """Unpadded rows of 3..10 tokens, labels on every token after the first."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 11, (1,), generator=gen))
        ids = torch.randint(4, vocab, (length,), generator=gen)
        labels = ids.clone()
        labels[0] = IGNORE
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _lora_b_nonzero(model: torch.nn.Module) -> None:
    with torch.no_grad():  # B = 0 at init would make every gradient of A vanish
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_bf16_autocast_dp_sgd_step_on_cpu(tiny_llama_dir: Path, quantization: str) -> None:
    model = build_model(_cfg(tiny_llama_dir, quantization), num_labels=0, seed=0, quantize_for=CPU)
    model.train()
    before = get_adapter_vector(model)
    params = [p for p in model.parameters() if p.requires_grad]
    data = _ragged(model.get_input_embeddings().weight.shape[0])
    dp = make_dp_training(
        module=model,
        optimizer=torch.optim.SGD(params, lr=0.05),
        data=data,  # type: ignore[arg-type]
        collate_fn=pad_collate(0),
        expected_batch_size=4,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(1),
        noise=SeededNoise(2),
    )
    for batch in dp.data_loader:
        if len(batch["labels"]):
            break
    dp.optimizer.zero_grad(set_to_none=True)
    with compute_precision("bf16", CPU):
        out = dp.module(**batch)
    assert out.logits.dtype == torch.bfloat16  # autocast really ran
    out.loss.backward()
    for p in params:  # one gradient per example for every LoRA tensor, in bfloat16
        assert p.grad_sample.shape == (len(batch["labels"]), *p.shape)
        assert p.grad_sample.dtype == torch.bfloat16 and p.dtype == torch.float32
    dp.optimizer.step()
    dp.close()
    after = get_adapter_vector(model)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 0


@pytest.mark.parametrize("grid", [True, False])
def test_clipping_of_bf16_per_example_gradients_is_not_done_in_bf16(grid: bool) -> None:
    """1010 ones: norm 31.780, which bfloat16 rounds down to 31.75; a clip factor from
    that norm would leave the clipped row at 1.00095 C, over the accounted bound."""
    assert float(torch.ones(1010, dtype=torch.bfloat16).norm()) == 31.75  # the trap is real
    param = torch.nn.Parameter(torch.zeros(1010))
    opt = sourced_dp_optimizer()(
        torch.optim.SGD([param], lr=1.0),
        noise=SeededNoise(0),
        grid=grid,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=1,
    )
    param.grad_sample = torch.ones(1, 1010, dtype=torch.bfloat16)
    opt.clip_and_accumulate()
    summed = param.summed_grad.double()
    if grid:
        summed = summed * opt.grid().grid  # integers on the grid -> the clipped row
        assert float(summed.norm()) <= 1.0 + 1e-6
    else:
        assert float(summed.norm()) == pytest.approx(1.0, abs=1e-6)


def test_train_local_with_bf16_precision(tiny_llama_dir: Path) -> None:
    model = build_model(_cfg(tiny_llama_dir), num_labels=0, seed=0)
    before = get_adapter_vector(model)
    data = _ragged(model.get_input_embeddings().weight.shape[0], n=8)
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=pad_collate(0))  # type: ignore[arg-type]
    result = train_local(
        model, loader, TrainConfig(learning_rate=0.01, precision="bf16"), device=CPU
    )
    assert result.steps == 2 and np.isfinite(result.loss)
    assert np.abs(get_adapter_vector(model) - before).max() > 0
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_unknown_precision_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"`precision` must be one of fp32, bf16, got 'fp16'"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]


def test_padding_width_does_not_change_any_per_example_gradient(tiny_llama_dir: Path) -> None:
    """Pad to each batch's longest row (fedtune's collate) or to a fixed 16: the per-example
    gradients Opacus computes (what is clipped, summed and noised) are the same."""
    from opacus.grad_sample import GradSampleModule

    from fedtune.tasks.causal_lm.loss import answer_loss

    model = build_model(_cfg(tiny_llama_dir), num_labels=0, seed=0)
    _lora_b_nonzero(model)
    model.train()
    rows = _ragged(model.get_input_embeddings().weight.shape[0], n=4)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for width in (None, 16):
        batch = pad_collate(0)(rows)
        if width is not None:
            extra = width - batch["input_ids"].shape[1]
            assert extra > 0
            for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE)):
                batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
        gsm.zero_grad(set_to_none=True)
        for p in params:
            p.grad_sample = None
        answer_loss(gsm, batch).backward()
        grads.append([p.grad_sample.clone() for p in params])
    assert any(float(g.abs().max()) > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    gsm._close()
