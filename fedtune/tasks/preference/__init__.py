"""Preference tuning with DPO: a LoRA adapter on a causal LM learns which answer people prefer.

``task = "preference"``: Direct Preference Optimization (Rafailov et al., NeurIPS
2023) on (prompt, chosen, rejected) triples, with the same DP-SGD, encryption and
run directory as every task. The model is the causal-LM task's (default
SmolLM2-135M-Instruct); the reference policy is that model with the adapter
disabled, so no second model is loaded. ``data`` has the triples (default: WordNet
definitions preferred to a sibling synset's), ``loss`` the DPO loss and its metrics
(held-out preference accuracy, reward margin, DPO loss); ``beta`` is DPO's β.
``fedtune generate`` and ``fedtune evaluate`` work on these runs.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune import data as fdata
from fedtune.errors import ConfigError
from fedtune.model import load_tokenizer, resolve_model_path
from fedtune.tasks.base import HELD_OUT_METRICS, ClientDatasets, Headline
from fedtune.tasks.causal_lm import CausalLMTask
from fedtune.tasks.preference import data as pref_data
from fedtune.tasks.preference.generate import rescore_run, write_samples
from fedtune.tasks.preference.loss import (
    ReferenceCache,
    dpo_loss,
    evaluate_preferences,
    example_metrics_preferences,
)
from fedtune.train.shared import process_model

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from fedtune.config import ModelConfig, RunConfig
    from fedtune.config.model import BaseQuantization
    from fedtune.train import EvalResult, LossFn

__all__ = ["PreferenceTask"]


class PreferenceTask:
    """``task = "preference"``: see the module docstring."""

    name = "preference"
    peft_task_type = "CAUSAL_LM"
    uses_labels = False
    generative = True
    headline = Headline("eval-accuracy", "held-out preference accuracy", (0.0, 1.0))
    eval_metrics = {
        **HELD_OUT_METRICS,  # eval-loss: the DPO loss; eval-accuracy: preference accuracy
        "eval-reward-margin": (-math.inf, math.inf, "finite"),
    }

    def __init__(self) -> None:
        self._causal = CausalLMTask()  # the model side is the causal LM's

    def loss_fn(self, cfg: RunConfig) -> LossFn:
        """DPO's loss at the run's ``beta``: a mean over pairs of each pair's own loss.

        Each call makes a new :class:`~fedtune.tasks.preference.loss.ReferenceCache`:
        one loss function serves one client's training set.
        """
        return partial(dpo_loss, beta=cfg.train.beta, reference=ReferenceCache())

    def default_model_path(self) -> Path:
        """SmolLM2-135M-Instruct, as for ``causal-lm``."""
        return self._causal.default_model_path()

    def check_model_path(self, cfg: ModelConfig, path: Path) -> None:
        """A causal LM, as for ``causal-lm``."""
        self._causal.check_model_path(cfg, path)

    def load_base_model(
        self, path: Path, *, num_labels: int, seed: int, quantization: BaseQuantization = "none"
    ) -> nn.Module:
        """The causal LM (``num_labels`` is ignored), quantised as it loads."""
        return self._causal.load_base_model(
            path, num_labels=num_labels, seed=seed, quantization=quantization
        )

    def preflight(self, cfg: RunConfig) -> RunConfig:
        """Check model, tokenizer, triples and partitions before the run starts."""

        fed = cfg.federation
        resolve_model_path(cfg.model)
        data = pref_data.load_preferences(cfg.data, seed=fed.seed)
        fdata.partition_indices(
            data.groups, cfg.data, num_partitions=fed.num_clients, seed=fed.seed
        )
        probe = pref_data.PreferenceDataset(
            load_tokenizer(cfg.model),
            data.subset(range(min(64, len(data)))),
            max_length=cfg.data.max_seq_length,
        )
        if len(probe) == 0:
            raise ConfigError(
                f"`max-seq-length` is {cfg.data.max_seq_length}: no pair keeps a token of "
                "both answers after its (templated) prompt; raise it."
            )
        process_model(cfg.model, num_labels=0, seed=fed.seed)  # checks lora-target-modules
        return cfg

    def client_datasets(
        self, cfg: RunConfig, tokenizer: Any, *, partition_id: int, num_partitions: int
    ) -> ClientDatasets:
        """Load, partition, split and encode one client's preference pairs."""
        seed = cfg.federation.seed
        data = pref_data.load_preferences(cfg.data, seed=seed)
        split = pref_data.preference_split(
            data, cfg.data, partition_id=partition_id, num_partitions=num_partitions, seed=seed
        )
        max_len = cfg.data.max_seq_length
        train = pref_data.PreferenceDataset(tokenizer, split.train, max_length=max_len)
        test = pref_data.PreferenceDataset(tokenizer, split.test, max_length=max_len)
        if len(train) == 0:
            raise ConfigError(
                f"`max-seq-length` is {max_len}, too short for any training pair of client "
                f"{partition_id} to keep a token of both answers; raise it."
            )
        return ClientDatasets(train_set=train, test_set=test, label_names=cfg.data.labels)

    def evaluate(
        self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device, cfg: RunConfig
    ) -> EvalResult:
        """Mean DPO loss, preference accuracy and mean reward margin over ``loader``."""
        return evaluate_preferences(model, loader, device=device, beta=cfg.train.beta)

    def example_metrics(
        self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device, cfg: RunConfig
    ) -> dict[str, list[float]]:
        """Per-pair DPO loss, preference accuracy and reward margin (for a DP evaluation)."""
        return example_metrics_preferences(model, loader, device=device, beta=cfg.train.beta)

    def derive_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        """Nothing to derive: every preference metric is reported."""
        return record

    def finish_run(self, run_dir: Path) -> None:
        """Answer a few fixed held-out prompts with the base model and the adapter."""
        write_samples(run_dir)

    def rescore(self, run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
        """Per-client and weighted held-out preference metrics of ``run_dir/adapter``."""
        return rescore_run(run_dir)
