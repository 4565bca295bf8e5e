"""Shared fixtures: a tiny config-built BERT (random init) and small data files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fedtune.config import ModelConfig

WORDS = {
    "animal": ["dog", "cat", "horse", "bird", "fish", "wolf"],
    "food": ["bread", "soup", "cheese", "apple", "rice", "cake"],
    "tool": ["hammer", "saw", "drill", "wrench", "knife", "spade"],
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT built from a config, with the bundled MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedtune.model import default_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def node_pins(model_dir: Path, max_seq_length: object) -> dict[str, object]:
    """A deployed node's own policy keys: ``model_dir`` pinned by hash, the token limit."""
    from fedtune.model.loading import model_digest

    pin = {"path": str(Path(model_dir).resolve()), "sha256": model_digest(Path(model_dir))}
    return {"models": [pin], "max-seq-length": max_seq_length}


def session_processes(sid: int) -> set[int]:
    """Live (non-zombie) processes in session ``sid``: everything a CLI run started."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.add(int(proc.name))
    return found


def toy_rows(n_per_label: int = 20, seed: int = 0) -> list[dict[str, str]]:
    """Short texts whose label is given away by a keyword: learnable by a tiny model."""
    import random

    rng = random.Random(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(n_per_label):
            w = rng.choice(words)
            rows.append(
                {
                    "text": f"a {w} that is {rng.choice(['big', 'small', 'red', 'old'])}",
                    "label": label,
                }
            )
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV file with `text` and `label` columns (3 labels, 120 rows)."""
    import csv

    path = tmp_path_factory.mktemp("toy") / "toy.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(toy_rows(40))
    return path


@pytest.fixture
def toy_jsonl(tmp_path: Path) -> Path:
    """The same rows as JSON lines with other column names (`sentence`, `topic`)."""
    path = tmp_path / "toy.jsonl"
    with path.open("w") as fh:
        for row in toy_rows(40):
            fh.write(json.dumps({"sentence": row["text"], "topic": row["label"]}) + "\n")
    return path


# --- Causal LM (task = "causal-lm") ---------------------------------------------------

#: ChatML with a fixed default system turn, like SmolLM2's template (masked out in training).
TINY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nyou are a helpful bot"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def toy_instruction_rows(n_per_label: int = 12, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/answer pairs whose answer follows from the prompt: learnable by a tiny LM."""
    import random

    rng = random.Random(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(n_per_label):
            w = rng.choice(words)
            rows.append({"prompt": f"what is a {w} ?", "answer": f"a {w} is a kind of {label} ."})
    rng.shuffle(rows)
    return rows


def tiny_lora_bert(*, vocab_size: int, max_len: int, rank: int = 8, seed: int = 0):  # type: ignore[no-untyped-def]
    """A 2-block BERT classifier (random init from ``seed``, dropout off) with LoRA of rank
    ``rank`` (alpha 2r) on query/value and a trained head: for DP-SGD tests on tokens."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_len,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    return peft.get_peft_model(model, lora)


def tiny_word_tokenizer(*, chat_template: str | None = TINY_CHAT_TEMPLATE):  # type: ignore[no-untyped-def]
    """A word-level tokenizer over the toy vocabulary (newlines are tokens, spaces are not)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    words = {"\n", "?", ".", "what", "is", "a", "kind", "of", "system", "user", "assistant"}
    words |= {"you", "are", "helpful", "bot", "define", "the", "word", "hello"}
    for label, items in WORDS.items():
        words |= {label, *items}
    vocab = {t: i for i, t in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Llama built from a config (random init) with the word tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def toy_instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL file of 36 prompt/answer pairs (3 topics)."""
    path = tmp_path_factory.mktemp("toy-lm") / "instructions.jsonl"
    with path.open("w") as fh:
        for row in toy_instruction_rows():
            fh.write(json.dumps(row) + "\n")
    return path


def toy_preference_rows(n_per_label: int = 8, seed: int = 0) -> list[dict[str, str]]:
    """Prompt, the right answer (chosen) and the same answer with a wrong category (rejected)."""
    import random

    rng = random.Random(seed)
    labels = list(WORDS)
    rows = []
    for label, words in WORDS.items():
        for _ in range(n_per_label):
            w = rng.choice(words)
            wrong = rng.choice([other for other in labels if other != label])
            rows.append(
                {
                    "prompt": f"what is a {w} ?",
                    "chosen": f"a {w} is a kind of {label} .",
                    "rejected": f"a {w} is a kind of {wrong} .",
                }
            )
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def toy_preferences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL file of 24 prompt/chosen/rejected triples (3 topics)."""
    path = tmp_path_factory.mktemp("toy-pref") / "preferences.jsonl"
    with path.open("w") as fh:
        for row in toy_preference_rows():
            fh.write(json.dumps(row) + "\n")
    return path


def lora_llama_config(model_dir: Path, quantization: str = "none") -> ModelConfig:
    """A causal-LM ``ModelConfig`` over the tiny Llama: LoRA rank 4 on q/v, ``quantization``."""
    from fedtune.config import ModelConfig

    return ModelConfig(
        task="causal-lm",
        model_path=str(model_dir),
        lora_rank=4,
        lora_alpha=8,
        lora_target_modules="q_proj,v_proj",
        base_quantization=quantization,  # type: ignore[arg-type]
    )
