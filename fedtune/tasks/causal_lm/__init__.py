"""Instruction tuning of a causal LM: answer-only loss, held-out answer perplexity.

The default: the bundled SmolLM2-135M-Instruct (``model``) on WordNet instruction
pairs, ``Define the word "X".`` -> its definition (``data``: chat formatting and
the answer-only mask). ``loss`` has the per-example answer loss DP-SGD needs and
the held-out metrics; ``generate`` answers prompts with a finished run's adapter
(``fedtune generate``, ``samples.jsonl``, re-scoring).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune import data as fdata
from fedtune.errors import ConfigError
from fedtune.model import load_tokenizer, resolve_model_path
from fedtune.tasks.base import HELD_OUT_METRICS, ClientDatasets, Headline
from fedtune.tasks.causal_lm import data as lm_data
from fedtune.tasks.causal_lm.generate import rescore_run, write_samples
from fedtune.tasks.causal_lm.loss import answer_loss, evaluate_lm, example_metrics_lm, perplexity
from fedtune.tasks.causal_lm.model import (
    check_causal_path,
    default_causal_model_path,
    load_causal_model,
)
from fedtune.train.shared import process_model

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from fedtune.config import ModelConfig, RunConfig
    from fedtune.config.model import BaseQuantization
    from fedtune.train import EvalResult

__all__ = ["CausalLMTask"]


class CausalLMTask:
    """``task = "causal-lm"``: see the module docstring."""

    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    uses_labels = False
    generative = True
    headline = Headline("eval-perplexity", "held-out answer perplexity")
    eval_metrics = HELD_OUT_METRICS

    def loss_fn(self, cfg: RunConfig):  # type: ignore[no-untyped-def]
        """The mean over rows of each row's mean answer-token NLL."""
        return answer_loss

    def default_model_path(self) -> Path:
        """SmolLM2-135M-Instruct, converted once from the bundled GGUF file."""
        return default_causal_model_path()

    def check_model_path(self, cfg: ModelConfig, path: Path) -> None:
        """The directory must hold a ``...ForCausalLM`` architecture."""
        check_causal_path(cfg, path)

    def load_base_model(
        self, path: Path, *, num_labels: int, seed: int, quantization: BaseQuantization = "none"
    ) -> nn.Module:
        """The causal LM itself (``num_labels`` is ignored), quantised as it loads."""
        return load_causal_model(path, seed=seed, quantization=quantization)

    def preflight(self, cfg: RunConfig) -> RunConfig:
        """Check model, tokenizer, data and partitions before the run starts."""

        fed = cfg.federation
        resolve_model_path(cfg.model)
        data = lm_data.load_instructions(cfg.data, seed=fed.seed)
        fdata.partition_indices(
            data.groups, cfg.data, num_partitions=fed.num_clients, seed=fed.seed
        )
        tokenizer = load_tokenizer(cfg.model)
        probe = lm_data.InstructionDataset(
            tokenizer, data.prompts[:64], data.answers[:64], max_length=cfg.data.max_seq_length
        )
        if len(probe) == 0:
            raise ConfigError(
                f"`max-seq-length` is {cfg.data.max_seq_length}: no example keeps an answer "
                "token after its (templated) prompt; raise it."
            )
        process_model(cfg.model, num_labels=0, seed=fed.seed)  # checks lora-target-modules
        return cfg

    def client_datasets(
        self, cfg: RunConfig, tokenizer: Any, *, partition_id: int, num_partitions: int
    ) -> ClientDatasets:
        """Load, partition, split and tokenise one client's instruction data."""
        seed = cfg.federation.seed
        data = lm_data.load_instructions(cfg.data, seed=seed)
        split = lm_data.instruction_split(
            data, cfg.data, partition_id=partition_id, num_partitions=num_partitions, seed=seed
        )
        max_len = cfg.data.max_seq_length
        train = lm_data.InstructionDataset(
            tokenizer, split.train_prompts, split.train_answers, max_length=max_len
        )
        test = lm_data.InstructionDataset(
            tokenizer, split.test_prompts, split.test_answers, max_length=max_len
        )
        if len(train) == 0:
            raise ConfigError(
                f"`max-seq-length` is {max_len}, too short for any training example of client "
                f"{partition_id} to keep an answer token after its prompt; raise it."
            )
        return ClientDatasets(train_set=train, test_set=test, label_names=cfg.data.labels)

    def evaluate(
        self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device, cfg: RunConfig
    ) -> EvalResult:
        """Answer-token loss and token accuracy over ``loader``."""
        return evaluate_lm(model, loader, device=device)

    def example_metrics(
        self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device, cfg: RunConfig
    ) -> dict[str, list[float]]:
        """Per-example mean answer-token loss and token accuracy (for a DP evaluation)."""
        return example_metrics_lm(model, loader, device=device)

    def derive_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add ``eval-perplexity = exp(eval-loss)`` to a record and each of its clients.

        Per client it is the perplexity of its held-out answer tokens; the weighted one
        is ``exp`` of the example-weighted mean loss (a weighted geometric mean of the
        clients' perplexities).
        """
        for part in [record, *record.get("clients", {}).values()]:
            loss = part.get("eval-loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                part["eval-perplexity"] = perplexity(float(loss))
        return record

    def finish_run(self, run_dir: Path) -> None:
        """Answer a few fixed held-out prompts with the base model and the adapter."""
        write_samples(run_dir)

    def rescore(self, run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
        """Per-client and weighted held-out answer loss / perplexity of ``run_dir/adapter``."""
        return rescore_run(run_dir)
