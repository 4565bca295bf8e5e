"""Preference tuning (DPO): the loss by hand, the masks, DP-SGD's per-pair gradients, the data."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_word_tokenizer
from torch import nn

from fedtune.config import ConfigError, DataConfig, parse_run_config
from fedtune.data.collate import IGNORE
from fedtune.tasks.preference import data as pref_data
from fedtune.tasks.preference.loss import dpo_loss, evaluate_preferences, sequence_logprob


class _ToyLM(nn.Module):
    """Next-token probabilities fixed per sequence id (the first token), policy or reference.

    Vocabulary {0, 1}: the answer token is 1; ``p[(seq, adapter on)]`` is its probability.
    """

    def __init__(self, p: dict[tuple[int, bool], float]) -> None:
        super().__init__()
        self.p, self.adapter_on = p, True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        probs = torch.tensor([self.p[(int(s), self.adapter_on)] for s in input_ids[:, 0]])
        logits = torch.stack([torch.log1p(-probs), torch.log(probs)], dim=-1)  # log(1-p), log p
        logits = logits[:, None, :].expand(len(input_ids), input_ids.shape[1], 2)

        class Out:
            pass

        out = Out()
        out.logits = logits  # type: ignore[attr-defined]
        return out


def _pair_batch() -> dict[str, torch.Tensor]:
    # One pair: chosen sequence id 0, rejected id 1; each has one answer token (id 1).
    ids = torch.tensor([[0, 1]]), torch.tensor([[1, 1]])
    labels = torch.tensor([[IGNORE, 1]])
    mask = torch.ones(1, 2, dtype=torch.long)
    return {
        "input_ids": ids[0],
        "attention_mask": mask,
        "labels": labels,
        "rejected_input_ids": ids[1],
        "rejected_attention_mask": mask,
        "rejected_labels": labels,
    }


def test_dpo_loss_against_a_case_worked_out_by_hand() -> None:
    # π(y_w) = 0.6, π_ref(y_w) = 0.5, π(y_l) = 0.3, π_ref(y_l) = 0.4, β = 0.5:
    # r_w = 0.5 ln(0.6 / 0.5) = 0.0911608, r_l = 0.5 ln(0.3 / 0.4) = -0.1438410,
    # L = -ln σ(r_w - r_l) = ln(1 + e^-0.2350018) = ln(1 + 0.7905694) = 0.5825337.
    model = _ToyLM({(0, True): 0.6, (0, False): 0.5, (1, True): 0.3, (1, False): 0.4})
    batch = _pair_batch()
    assert float(
        sequence_logprob(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ) == pytest.approx(math.log(0.6))
    assert float(dpo_loss(model, batch, beta=0.5)) == pytest.approx(0.5825337, abs=1e-6)
    result = evaluate_preferences(model, [batch], device=torch.device("cpu"), beta=0.5)
    assert result.accuracy == 1.0 and result.loss == pytest.approx(0.5825337, abs=1e-6)
    assert result.extra["eval-reward-margin"] == pytest.approx(0.2350018, abs=1e-6)
    # A preference the policy gets wrong: swap the policy's probabilities.
    wrong = _ToyLM({(0, True): 0.3, (0, False): 0.5, (1, True): 0.6, (1, False): 0.4})
    assert (
        evaluate_preferences(wrong, [batch], device=torch.device("cpu"), beta=0.5).accuracy == 0.0
    )


def _tokens(tok, labels: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    return ["_" if v == IGNORE else tok.convert_ids_to_tokens(v) for v in labels]


def test_each_half_of_a_pair_is_labelled_on_its_answer_only() -> None:
    tok = tiny_word_tokenizer()
    data = pref_data.PreferenceData(
        ["what is a dog ?"], ["a dog is a kind of animal ."], ["a dog is a kind of food ."], [0]
    )
    dataset = pref_data.PreferenceDataset(tok, data, max_length=64)
    item = dataset[0]
    chosen = [t for t in _tokens(tok, item["labels"].tolist()) if t != "_"]
    rejected = [t for t in _tokens(tok, item["rejected_labels"].tolist()) if t != "_"]
    assert chosen == ["a", "dog", "is", "a", "kind", "of", "animal", ".", "<|im_end|>"]
    assert rejected == ["a", "dog", "is", "a", "kind", "of", "food", ".", "<|im_end|>"]
    n_prompt = len(item["input_ids"]) - len(chosen) - 1  # the template's trailing newline
    assert item["input_ids"][:n_prompt].tolist() == item["rejected_input_ids"][:n_prompt].tolist()
    assert set(item["labels"][:n_prompt].tolist()) == {IGNORE}
    batch = dataset.collate_fn()([dataset[0], dataset[0]])
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "rejected_input_ids",
        "rejected_attention_mask",
        "rejected_labels",
        "row",
    }
    assert batch["row"].tolist() == [0, 0]
    # The prompt alone is longer than 8 tokens: each half is truncated, never dropped,
    # and keeps max_length // 2 tokens of its answer (issue 26).
    short = pref_data.PreferenceDataset(tok, data, max_length=8)
    assert len(short) == 1
    for ids, labels in (short.rows[0][:2], short.rows[0][2:]):
        assert len(ids) == 8 and sum(v != IGNORE for v in labels) == 4


def _tiny_lora_llama(path: Path) -> nn.Module:
    from fedtune.config import ModelConfig
    from fedtune.model import build_model

    cfg = ModelConfig(task="preference", model_path=str(path), lora_target_modules="q_proj,v_proj")
    return build_model(cfg, num_labels=0, seed=0)


def _moved_model_and_pairs(path: Path) -> tuple[nn.Module, pref_data.PreferenceDataset]:
    """The tiny LoRA Llama with B moved off zero (policy != reference) and 3 toy pairs."""
    from conftest import toy_preference_rows

    model = _tiny_lora_llama(path)
    with torch.no_grad():  # B starts at zero: move it so that policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    rows = toy_preference_rows(1)
    data = pref_data.PreferenceData(
        [r["prompt"] for r in rows],
        [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
        [0] * 3,
    )
    return model, pref_data.PreferenceDataset(tiny_word_tokenizer(), data, max_length=64)


def test_opacus_per_sample_gradients_are_each_pairs_own_gradient(tiny_llama_dir: Path) -> None:
    from opacus.grad_sample import GradSampleModule

    model, dataset = _moved_model_and_pairs(tiny_llama_dir)
    model.train()
    batch = dataset.collate_fn()([dataset[i] for i in range(3)])
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm.forbid_grad_accumulation()
    dpo_loss(gsm, batch, beta=0.3).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable}
    assert all(g.shape[0] == 3 for g in per_sample.values())  # one row per pair
    gsm.zero_grad()
    gsm._close()
    for i in range(3):
        model.zero_grad()
        one = dataset.collate_fn()([dataset[i]])
        dpo_loss(model, one, beta=0.3).backward()
        for n, p in trainable:
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-4, atol=1e-6)


def test_the_reference_cache_changes_no_gradient(tiny_llama_dir: Path) -> None:
    # The reference log-probabilities are kept after a pair's first pass; a warm cache
    # must give the same per-sample gradients (within float noise) as recomputing them.
    from opacus.grad_sample import GradSampleModule

    from fedtune.tasks import get_task
    from fedtune.tasks.preference.loss import ReferenceCache

    model, dataset = _moved_model_and_pairs(tiny_llama_dir)
    collate = dataset.collate_fn()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def per_sample(batch, reference):  # type: ignore[no-untyped-def]
        gsm.zero_grad(set_to_none=True)
        for p in trainable:
            p.grad_sample = None
        dpo_loss(gsm, batch, beta=0.3, reference=reference).backward()
        return [p.grad_sample.detach().clone() for p in trainable]

    cache = ReferenceCache()
    first = per_sample(collate([dataset[2], dataset[0]]), cache)  # computes rows 2 and 0
    assert len(cache) == 2
    warm = per_sample(collate([dataset[2], dataset[0]]), cache)  # served from the cache
    cold = per_sample(collate([dataset[2], dataset[0]]), None)
    for a, b, c in zip(first, warm, cold, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-6)
    per_sample(collate([dataset[1], dataset[0]]), cache)  # one new row: recomputed as a batch
    assert len(cache) == 3
    task = get_task("preference")
    cfg = parse_run_config({"task": "preference"})
    assert task.loss_fn(cfg).keywords["reference"] is not task.loss_fn(cfg).keywords["reference"]


def test_wordnet_pairs_prefer_the_synsets_own_definition_to_a_siblings() -> None:
    from fedtune import data as fdata

    cfg = DataConfig(examples_per_label=3, preference_pairs="sibling")
    data = pref_data.wordnet_preferences(cfg, seed=1)
    again = pref_data.wordnet_preferences(cfg, seed=1)
    assert data == again and 20 <= len(data) <= 24 and sorted(set(data.groups)) == list(range(8))
    synsets = fdata.read_wordnet(Path(cfg.wordnet_dir))
    by_definition = {s.definition: s for s in synsets}
    for prompt, good, bad in zip(data.prompts, data.chosen, data.rejected, strict=True):
        own, sibling = by_definition[good], by_definition[bad]
        assert prompt == f'Define the word "{own.lemma}".' and good != bad
        assert set(own.hypernyms) & set(sibling.hypernyms), (own, sibling)
    assert pref_data.wordnet_preferences(cfg, seed=2) != data


def test_wordnet_pairs_prefer_the_definition_with_its_usage_example() -> None:
    from fedtune import data as fdata

    cfg = DataConfig(examples_per_label=3)  # preference-pairs = "usage-example", the default
    data = pref_data.wordnet_preferences(cfg, seed=1)
    assert data == pref_data.wordnet_preferences(cfg, seed=1)
    assert len(data) == 24 and sorted(set(data.groups)) == list(range(8))
    by_definition = {s.definition: s for s in fdata.read_wordnet(Path(cfg.wordnet_dir))}
    for prompt, good, bad in zip(data.prompts, data.chosen, data.rejected, strict=True):
        synset = by_definition[bad]  # the rejected answer is a bare WordNet definition
        assert prompt == f'Define the word "{synset.lemma}".'
        assert good == f'{bad}. For example: "{synset.examples[0]}"'
    assert pref_data.wordnet_preferences(cfg, seed=2) != data
    with pytest.raises(ConfigError, match=r"`preference-pairs` must be one of"):
        parse_run_config({"task": "preference", "preference-pairs": "random"})


def test_usage_examples_are_read_from_the_gloss() -> None:
    from fedtune.data import wordnet_definition, wordnet_examples

    gloss = 'a small domesticated carnivore; "the cat sat"; "cats purr" - anon  \n'
    assert wordnet_definition(gloss) == "a small domesticated carnivore"
    assert wordnet_examples(gloss) == ("the cat sat", "cats purr")
    assert wordnet_examples("no example here  ") == ()


def test_own_triples_and_errors_that_name_the_column(toy_preferences: Path, tmp_path: Path) -> None:
    data = pref_data.load_preferences(DataConfig(data_path=str(toy_preferences)), seed=0)
    assert len(data) == 24 and data.chosen[0].startswith("a ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "wrong": "b"}) + "\n")
    with pytest.raises(
        ConfigError,
        match=r"`rejected-column` is 'rejected', but .* its columns are: prompt, chosen, wrong",
    ):
        pref_data.load_preferences(DataConfig(data_path=str(bad)), seed=0)
    with pytest.raises(ConfigError, match=r"`beta` must be > 0"):
        parse_run_config({"task": "preference", "beta": 0})


def test_the_reference_pass_leaves_ffa_loras_frozen_a_frozen(tiny_llama_dir: Path) -> None:
    # PEFT's disable_adapter() marks every adapter tensor trainable again on exit: before
    # the fix one DPO step unfroze FFA-LoRA's A (the payload grew from B to A + B).
    from fedtune.config import ModelConfig
    from fedtune.model import adapter_layout, build_model

    cfg = ModelConfig(
        task="preference",
        model_path=str(tiny_llama_dir),
        lora_target_modules="q_proj,v_proj",
        lora_variant="ffa",
    )
    model = build_model(cfg, num_labels=0, seed=0)
    before = adapter_layout(model)
    assert before.names and all("lora_B" in n for n in before.names)
    rows = [("what is a dog ?", "a dog is a kind of animal .", "a dog is a kind of food .")]
    data = pref_data.PreferenceData(*map(list, zip(*rows, strict=True)), [0])
    dataset = pref_data.PreferenceDataset(tiny_word_tokenizer(), data, max_length=64)
    dpo_loss(model, dataset.collate_fn()([dataset[0]]), beta=0.1).backward()
    assert adapter_layout(model) == before
