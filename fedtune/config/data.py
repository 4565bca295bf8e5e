"""Where examples come from and how they are split across clients (``data-path``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fedtune.config._checks import choice, require

EXAMPLES_PER_LABEL = 250
"""The default ``examples-per-label``: WordNet definitions drawn per category."""

__all__ = ["DataConfig", "Partitioning", "PreferencePairs"]

Partitioning = Literal["iid", "dirichlet"]
#: How the default (WordNet) preference data pairs a chosen with a rejected answer.
PreferencePairs = Literal["usage-example", "sibling"]


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are split across clients.

    ``data-path = ""`` selects the bundled default: WordNet 3.0 noun definitions
    labelled by lexicographer category. Otherwise a ``.csv`` / ``.jsonl`` file or a
    Hugging Face dataset directory written by ``Dataset.save_to_disk``.

    With ``task = "causal-lm"`` the default is WordNet instruction pairs
    ("Define the word X." -> its gloss); own data has ``prompt-column`` and
    ``answer-column`` (or only ``text-column``: plain text, loss on every token);
    preference data (``task = "preference"``) has ``prompt-column``, ``chosen-column``
    and ``rejected-column``; its WordNet default pairs answers by ``preference-pairs``
    (see :mod:`fedtune.tasks.preference.data`).
    """

    data_path: str = ""
    label_names: str = ""
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    preference_pairs: PreferencePairs = "usage-example"
    wordnet_dir: str = "/usr/share/wordnet"
    examples_per_label: int = EXAMPLES_PER_LABEL
    max_examples: int = 0
    partitioning: Partitioning = "iid"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    max_seq_length: int = 48

    @property
    def labels(self) -> list[str]:
        """``label-names`` as a list (empty when derived from the data)."""
        return [n.strip() for n in self.label_names.split(",") if n.strip()]

    def __post_init__(self) -> None:
        require(
            len(set(self.labels)) == len(self.labels),
            "label-names",
            self.label_names,
            "must not repeat a name",
        )
        require(bool(self.text_column), "text-column", self.text_column, "must not be empty")
        require(bool(self.label_column), "label-column", self.label_column, "must not be empty")
        require(bool(self.prompt_column), "prompt-column", self.prompt_column, "must not be empty")
        require(bool(self.answer_column), "answer-column", self.answer_column, "must not be empty")
        require(bool(self.chosen_column), "chosen-column", self.chosen_column, "must not be empty")
        require(
            bool(self.rejected_column), "rejected-column", self.rejected_column, "must not be empty"
        )
        require(
            self.examples_per_label >= 0,
            "examples-per-label",
            self.examples_per_label,
            "must be >= 0 (0 keeps every WordNet definition)",
        )
        require(
            self.max_examples >= 0,
            "max-examples",
            self.max_examples,
            "must be >= 0 (0 keeps every example)",
        )
        choice("partitioning", self.partitioning, get_args(Partitioning))
        choice("preference-pairs", self.preference_pairs, get_args(PreferencePairs))
        require(
            self.dirichlet_alpha > 0,
            "dirichlet-alpha",
            self.dirichlet_alpha,
            "must be > 0 (smaller is more skewed; try 0.1 to 1.0)",
        )
        require(
            0.0 < self.test_fraction < 1.0,
            "test-fraction",
            self.test_fraction,
            "must be in (0, 1)",
        )
        require(self.max_seq_length >= 8, "max-seq-length", self.max_seq_length, "must be >= 8")
        # examples-per-label draws from the bundled WordNet data; a user's own file is
        # used whole, so a value other than the default (or 0, "all") would be ignored.
        require(
            not self.data_path or self.examples_per_label in (0, EXAMPLES_PER_LABEL),
            "examples-per-label",
            self.examples_per_label,
            "applies to the bundled WordNet data only: with `data-path` every row of the "
            "file is used; remove the key, or cap the data with `max-examples`",
        )
