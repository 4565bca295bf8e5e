"""Causal-LM task: answer-only masks token by token, the per-example loss under DP-SGD,
data sources and their errors, and one client round on a tiny config-built Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_word_tokenizer

from fedtune.config import ConfigError, DataConfig, parse_run_config
from fedtune.resolve import resolve
from fedtune.tasks.causal_lm import data as lm_data
from fedtune.tasks.causal_lm import loss as lm_train

IGN = "_"  # a masked label, in the expected sequences below


def _tokens(tok, ids: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    return [t for t in tok.convert_ids_to_tokens(ids)]


def _labels(tok, labels: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    return [IGN if v == lm_data.IGNORE else tok.convert_ids_to_tokens(v) for v in labels]


def test_chat_template_mask_keeps_answer_and_end_of_turn_only() -> None:
    tok = tiny_word_tokenizer()
    ids, labels = lm_data.encode_example(
        tok, "what is a dog ?", "a dog is a kind of animal .", max_length=64
    )
    system = ["<|im_start|>", "system", "\n", "you", "are", "a", "helpful", "bot", "<|im_end|>"]
    user = ["\n", "<|im_start|>", "user", "\n", "what", "is", "a", "dog", "?", "<|im_end|>", "\n"]
    gen = ["<|im_start|>", "assistant", "\n"]
    answer = ["a", "dog", "is", "a", "kind", "of", "animal", ".", "<|im_end|>"]
    assert _tokens(tok, ids) == [*system, *user, *gen, *answer, "\n"]
    masked = len(system) + len(user) + len(gen)
    assert _labels(tok, labels) == [IGN] * masked + answer + [IGN]


def test_plain_prompt_mask_without_chat_template() -> None:
    tok = tiny_word_tokenizer(chat_template=None)
    ids, labels = lm_data.encode_example(tok, "what is a cat ?", "a cat", max_length=64)
    assert _tokens(tok, ids) == ["<s>", "what", "is", "a", "cat", "?", "a", "cat", "<|im_end|>"]
    assert _labels(tok, labels) == [IGN] * 6 + ["a", "cat", "<|im_end|>"]
    # Plain text (no prompt): every token after the BOS is an answer token.
    ids, labels = lm_data.encode_example(tok, "", "a cat is a kind of animal", max_length=64)
    assert _labels(tok, labels)[0] == IGN and IGN not in _labels(tok, labels)[1:]


def test_truncation_cuts_the_answer_and_keeps_every_example() -> None:
    tok = tiny_word_tokenizer()
    ids, labels = lm_data.encode_example(tok, "what is a dog ?", "a dog", max_length=25)
    assert len(ids) == len(labels) == 25  # 23 prompt and 4 answer tokens: the prompt is cut
    assert _labels(tok, labels)[-4:] == ["a", "dog", "<|im_end|>", IGN]
    # 19 prompt and 10 answer tokens in 16: the answer keeps its first 16 // 2 (its
    # end-of-turn is cut), the prompt its first 4 and last 4.
    ids, labels = lm_data.encode_example(tok, "dog", "a dog is a kind of animal .", max_length=16)
    assert _labels(tok, labels) == [IGN] * 8 + ["a", "dog", "is", "a", "kind", "of", "animal", "."]
    # The prompt alone (23 tokens) no longer fits in 20: the answer keeps 20 // 2 = 10
    # tokens at most (here its 4: a, cat, <|im_end|>, newline), the prompt its first 8
    # and last 8 tokens. No example is dropped (issue 26: counts must not depend on data).
    data = lm_data.InstructionDataset(
        tok, ["what is a dog ?", "what is a cat ?"], ["a dog", "a cat"], max_length=20
    )
    assert len(data) == 2
    first = ["<|im_start|>", "system", "\n", "you", "are", "a", "helpful", "bot"]
    last = ["a", "cat", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    answer = ["a", "cat", "<|im_end|>", "\n"]
    assert _tokens(tok, data.input_ids[1]) == [*first, *last, *answer]
    assert _labels(tok, data.labels[1]) == [IGN] * 16 + ["a", "cat", "<|im_end|>", IGN]


@pytest.mark.parametrize(
    ("head", "tail", "max_length", "kept"),
    [
        (10, 5, 16, (10, 5)),  # fits: whole
        (30, 5, 16, (11, 5)),  # long prompt: the answer whole, the prompt cut
        (30, 40, 16, (8, 8)),  # both long: half each
        (4, 40, 16, (4, 12)),  # long answer: the prompt whole, the answer cut
        (30, 0, 16, (16, 0)),  # nothing to label (no template, no eos): still one example
        (30, 1, 8, (7, 1)),
    ],
)
def test_fit_example_by_hand(head: int, tail: int, max_length: int, kept: tuple[int, int]) -> None:
    assert lm_data.fit_example(head, tail, max_length=max_length) == kept


def test_fit_example_keeps_an_answer_token_whatever_the_lengths() -> None:
    for max_length in (2, 3, 8, 9, 48):
        for head in range(0, 3 * max_length):
            for tail in range(1, 3 * max_length):
                h, t = lm_data.fit_example(head, tail, max_length=max_length)
                assert 1 <= t <= tail and 0 <= h <= head and h + t <= max_length
                assert h + t == min(head + tail, max_length)
    with pytest.raises(ValueError, match="max_length >= 2, got head=1, tail=1, max_length=1"):
        lm_data.fit_example(1, 1, max_length=1)


def test_an_empty_answer_is_one_example_labelled_on_its_end_of_turn() -> None:
    tok = tiny_word_tokenizer()
    data = lm_data.InstructionDataset(tok, ["what is a dog ?"], [""], max_length=48)
    assert len(data) == 1
    assert [t for t in _labels(tok, data.labels[0]) if t != IGN] == ["<|im_end|>"]


def test_collate_pads_right_with_ignored_labels() -> None:
    tok = tiny_word_tokenizer()
    data = lm_data.InstructionDataset(
        tok,
        ["what is a dog ?", "what is a cat ?"],
        ["a dog", "a cat is a kind of animal ."],
        max_length=64,
    )
    batch = data.collate_fn()([data[0], data[1]])
    short, long_ = len(data.input_ids[0]), len(data.input_ids[1])
    assert batch["input_ids"].shape == (2, long_)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (long_ - short)
    assert (batch["labels"][0, short:] == lm_data.IGNORE).all()
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()


def _tiny_lora_llama(path: Path, *, seed: int = 0) -> torch.nn.Module:
    from fedtune.config import ModelConfig
    from fedtune.model import build_model

    cfg = ModelConfig(task="causal-lm", model_path=str(path), lora_target_modules="q_proj,v_proj")
    return build_model(cfg, num_labels=0, seed=seed)


def _batch(tiny_llama_dir: Path) -> dict[str, torch.Tensor]:
    tok = tiny_word_tokenizer()
    data = lm_data.InstructionDataset(
        tok,
        ["what is a dog ?", "what is a saw ?", "what is a apple ?"],
        ["a dog", "a saw is a kind of tool .", "a apple is a kind of food ."],
        max_length=64,
    )
    return data.collate_fn()([data[i] for i in range(3)])


def test_answer_loss_is_a_mean_of_per_example_means(tiny_llama_dir: Path) -> None:
    model = _tiny_lora_llama(tiny_llama_dir)
    batch = _batch(tiny_llama_dir)
    loss = lm_train.answer_loss(model, batch)
    singles, counts = [], []
    with torch.no_grad():
        for i in range(3):
            width = int(batch["attention_mask"][i].sum())
            row = {k: v[i : i + 1, :width] for k, v in batch.items()}
            # A lone example: its mean answer NLL is HF's own loss (computed independently).
            singles.append(float(model(**row).loss))
            counts.append(int((row["labels"][:, 1:] != lm_data.IGNORE).sum()))
        hf_batch = float(model(**batch).loss)
    assert counts == [3, 9, 9]  # "a dog <|im_end|>" vs. 8 answer words + end of turn
    assert float(loss) == pytest.approx(sum(singles) / 3, rel=1e-5)
    # HF's batch loss weights each example by its token count: not a per-example mean, so
    # one example's gradient would depend on the others' lengths (wrong under DP-SGD).
    weighted = sum(s * n for s, n in zip(singles, counts, strict=True)) / sum(counts)
    assert hf_batch == pytest.approx(weighted, rel=1e-5)


def test_opacus_per_sample_gradients_are_each_examples_own_gradient(
    tiny_llama_dir: Path,
) -> None:
    from opacus.grad_sample import GradSampleModule

    model = _tiny_lora_llama(tiny_llama_dir)
    model.train()
    batch = _batch(tiny_llama_dir)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    lm_train.answer_loss(gsm, batch).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable}
    gsm.zero_grad()
    gsm._close()
    for i in range(3):
        model.zero_grad()
        width = int(batch["attention_mask"][i].sum())
        row = {k: v[i : i + 1, :width] for k, v in batch.items()}
        lm_train.answer_loss(model, row).backward()
        for n, p in trainable:
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-4, atol=1e-6)


def test_evaluate_reports_token_perplexity(tiny_llama_dir: Path) -> None:
    from fedtune.train import make_loader

    model = _tiny_lora_llama(tiny_llama_dir)
    tok = tiny_word_tokenizer()
    data = lm_data.InstructionDataset(tok, ["what is a dog ?"], ["a dog"], max_length=64)
    result = lm_train.evaluate_lm(
        model, make_loader(data, batch_size=4, shuffle=False), device=torch.device("cpu")
    )
    batch = data.collate_fn()([data[0]])
    assert result.loss == pytest.approx(float(model(**batch).loss), rel=1e-5)
    assert lm_train.perplexity(result.loss) == pytest.approx(math.exp(result.loss))
    assert result.num_examples == 1 and 0.0 <= result.accuracy <= 1.0


def test_wordnet_instructions_are_define_the_word_pairs() -> None:
    data = lm_data.load_wordnet_instructions(DataConfig(examples_per_label=3), seed=1)
    assert len(data) == 24 and sorted(set(data.groups)) == list(range(8))
    assert all(p.startswith('Define the word "') and p.endswith('".') for p in data.prompts)
    assert all(a and '"' not in a[:1] for a in data.answers)
    again = lm_data.load_wordnet_instructions(DataConfig(examples_per_label=3), seed=1)
    assert again == data


def test_own_jsonl_pairs_and_plain_text(tmp_path: Path, toy_instructions: Path) -> None:
    data = lm_data.load_instructions(DataConfig(data_path=str(toy_instructions)), seed=0)
    assert len(data) == 36 and not data.plain_text
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5)))
    data = lm_data.load_instructions(DataConfig(data_path=str(plain)), seed=0)
    assert data.plain_text and data.prompts == [""] * 5


@pytest.mark.parametrize(
    ("row", "settings", "match"),
    [
        (
            {"question": "q", "answer": "a"},
            {},
            "`prompt-column` is 'prompt', but .* has no such column; its columns are: "
            "question, answer",
        ),
        (
            {"prompt": "q", "reply": "a"},
            {},
            "`answer-column` is 'answer', but .* has no such column; its columns are: "
            "prompt, reply",
        ),
        (
            {"prompt": "q", "answer": "a"},
            {"partitioning": "dirichlet"},
            "`partitioning` is 'dirichlet', but instruction data from `data-path` has no labels",
        ),
    ],
)
def test_bad_instruction_data_names_key_and_value(
    tmp_path: Path, row: dict[str, str], settings: dict[str, str], match: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match=match):
        lm_data.load_instructions(DataConfig(data_path=str(path), **settings), seed=0)  # type: ignore[arg-type]


def test_unknown_task_names_key_and_value() -> None:
    with pytest.raises(
        ConfigError, match="`task` must be one of classification, causal-lm, preference, got"
    ):
        resolve({"task": "seq2seq"})
    with pytest.raises(ConfigError, match="`max-new-tokens` must be >= 1, got 0"):
        parse_run_config({"max-new-tokens": 0})


def test_classifier_directory_is_refused_for_the_causal_task(tiny_model_dir: Path) -> None:
    from fedtune.model import resolve_model_path

    cfg = parse_run_config({"task": "causal-lm", "model-path": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match="holds a BertForSequenceClassification, but `task`"):
        resolve_model_path(cfg.model)


def test_one_client_round_with_dp_lowers_held_out_loss(
    tiny_llama_dir: Path, toy_instructions: Path, tmp_path: Path
) -> None:
    from fedtune.train.runtime import ClientRuntime

    cfg = parse_run_config(
        {
            "task": "causal-lm",
            "model-path": str(tiny_llama_dir),
            "data-path": str(toy_instructions),
            "lora-target-modules": "q_proj,v_proj",
            "num-clients": 1,
            "min-clients": 1,
            "num-rounds": 2,
            "batch-size": 8,
            "local-epochs": 12,
            "learning-rate": 0.5,
            "optimizer": "sgd",
            "dp": "example",
            # σ = 0.3 and 8 epochs sat on the margins (accuracy 0.079 once in CI; 70
            # draws here: loss drops 0.11-0.19, accuracy 0.11-0.49); these settings'
            # 60 draws all dropped the loss by 0.17-0.22 and reached accuracy 0.22-0.33.
            "noise-multiplier": 0.1,
            "epsilon-budget": 1e9,  # this test checks learning under clipping + noise
            "max-grad-norm": 1.0,
        }
    )
    client = ClientRuntime(cfg, partition_id=0, num_partitions=1, privacy_dir=tmp_path)
    before = client.evaluate(None, server_round=0)
    outcome = client.train(None, server_round=1)
    assert outcome.payload is not None and outcome.epsilon is not None and outcome.epsilon > 0
    from fedtune.train.runtime import GlobalState

    after = client.evaluate(
        GlobalState(payload=outcome.payload, num_examples=outcome.num_examples), server_round=1
    )
    # Random init, LoRA on attention only: the loss moves slowly, the greedy tokens fast.
    assert after.loss < before.loss - 0.1, (before, after)
    assert after.accuracy > before.accuracy + 0.1, (before, after)
