"""Where examples come from and how they are split across clients (``data-path``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    labelled by lexicographer category; with ``task = "causal-lm"`` WordNet
    instruction pairs ("Define the word X." -> its gloss); with ``task = "preference"``
    WordNet preference pairs (:mod:`fedtune.tasks.preference.data`).

    Each field's ``metadata["help"]`` is its key's one description (``--help`` and
    ``docs/configuration.md`` are generated from it, :mod:`fedtune.config.reference`).
    """

    data_path: str = field(
        default="",
        metadata={
            "help": "A `.csv` / `.jsonl` file or a `Dataset.save_to_disk` directory; empty: "
            "WordNet noun definitions (for `causal-lm` and `preference`, WordNet pairs)."
        },
    )
    label_names: str = field(
        default="",
        metadata={
            "help": "Comma-separated label order every party uses; empty: derived from the "
            "data (sorted); with WordNet, a subset of the 8 categories. Required with your "
            "own data when DP is on."
        },
    )
    text_column: str = field(default="text", metadata={"help": "The text column of your own data."})
    label_column: str = field(
        default="label", metadata={"help": "The label column of your own data."}
    )
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Causal LM and preference: the instruction column of your own data."},
    )
    answer_column: str = field(
        default="answer",
        metadata={
            "help": "Causal LM: the answer column of your own data (a file with only "
            "`text-column` is plain text: loss on every token)."
        },
    )
    chosen_column: str = field(
        default="chosen",
        metadata={"help": "Preference: the preferred answer column of your own data."},
    )
    rejected_column: str = field(
        default="rejected",
        metadata={"help": "Preference: the rejected answer column of your own data."},
    )
    preference_pairs: PreferencePairs = field(
        default="usage-example",
        metadata={
            "help": "Preference on WordNet: `usage-example` prefers a definition followed by "
            "its usage example to the bare definition; `sibling` prefers a word's own "
            "definition to a sibling synset's."
        },
    )
    wordnet_dir: str = field(
        default="/usr/share/wordnet",
        metadata={"help": "Where the Debian package `wordnet-base` put `data.noun`."},
    )
    examples_per_label: int = field(
        default=EXAMPLES_PER_LABEL,
        metadata={
            "help": "WordNet definitions drawn per category (0 = all); with `data-path`, "
            "set only as 0 (every row is used; cap it with `max-examples`)."
        },
    )
    max_examples: int = field(
        default=0,
        metadata={"help": "A cap on the whole data set, drawn with the seed (0 = no cap)."},
    )
    partitioning: Partitioning = field(
        default="iid",
        metadata={
            "help": "How the data is split across clients: `iid` (seeded shuffle, equal "
            "shards) or `dirichlet` (label skew by `dirichlet-alpha`)."
        },
    )
    dirichlet_alpha: float = field(
        default=0.5,
        metadata={"help": "Dirichlet concentration (> 0); smaller is more skewed."},
    )
    test_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Share of each simulated client's partition held out for evaluation, in "
            "(0, 1) (a deployed node's is its own policy's); which examples are held out "
            "depends on the data only, not on `seed`."
        },
    )
    max_seq_length: int = field(
        default=48,
        metadata={"help": "Tokens per example, >= 8 (WordNet definitions: mean 16, p95 31)."},
    )

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
        # Values only: where the keys as a person set them are known, a set key is
        # refused at any value (fedtune.config.parse.check_given).
        require(
            not self.data_path or self.examples_per_label in (0, EXAMPLES_PER_LABEL),
            "examples-per-label",
            self.examples_per_label,
            "applies to the bundled WordNet data only: with `data-path` every row of the "
            "file is used; remove the key, or cap the data with `max-examples`",
        )
