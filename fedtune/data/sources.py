"""Data sources shared by the tasks: WordNet, the user's own tables, labelled texts.

* the bundled default: WordNet 3.0 noun synsets (Debian package ``wordnet-base``,
  WordNet licence: use, copy, modify and distribute freely), read once by
  :func:`read_wordnet` and drawn per lexicographer category by
  :func:`sample_by_category` (classification labels its definitions by category;
  the causal-LM task turns them into instruction pairs);
* a ``.csv`` or ``.jsonl`` file, or a Hugging Face dataset directory written by
  ``Dataset.save_to_disk`` (:func:`read_table`), for classification with a text and
  a label column (:func:`load_table`).
"""

from __future__ import annotations

import codecs
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config import DataConfig
from fedtune.data.memo import data_key, file_stamp, process_memo
from fedtune.errors import ConfigError

#: WordNet lexicographer file number -> category name (see ``lexnames(5WN)``).
WORDNET_CATEGORIES: dict[int, str] = {
    5: "animal",
    20: "plant",
    13: "food",
    18: "person",
    6: "artifact",
    15: "location",
    8: "body",
    27: "substance",
}

TEXT = "text"
LABEL = "label"


@dataclass(frozen=True)
class LabelledData:
    """A whole data set: texts, integer labels and the label names."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def wordnet_definition(gloss: str) -> str:
    """Keep a gloss's definition and drop its quoted usage examples."""
    return gloss.split('; "', 1)[0].strip().strip('"').strip()


def wordnet_examples(gloss: str) -> tuple[str, ...]:
    """A gloss's quoted usage examples (``definition; "example"; "another"``), in order."""
    quoted = (part.split('"', 1)[0].strip() for part in gloss.split('; "')[1:])
    return tuple(example for example in quoted if example)


@dataclass(frozen=True)
class Synset:
    """One WordNet noun synset: lexicographer file, first lemma, definition, place in the tree.

    ``offset`` is the synset's id in ``data.noun``; ``hypernyms`` are the offsets of
    its hypernyms (pointers ``@`` and ``@i``), so synsets that share one are siblings.
    ``examples`` are the gloss's quoted usage examples (most synsets have none).
    """

    lexfile: int
    lemma: str
    definition: str
    offset: int = 0
    hypernyms: tuple[int, ...] = ()
    examples: tuple[str, ...] = ()


@process_memo(lambda directory: file_stamp(Path(directory) / "data.noun"), maxsize=2)
def read_wordnet(directory: Path) -> list[Synset]:
    """Every noun synset of ``directory/data.noun`` that has a definition.

    Read once per process (:mod:`fedtune.data.memo`); callers must not modify the list.
    """
    path = directory / "data.noun"
    if not path.is_file():
        raise ConfigError(
            f"`wordnet-dir` {str(directory)!r} has no data.noun: install the Debian "
            "package `wordnet-base` (apt-get install wordnet-base), or set `data-path` "
            "to your own data file."
        )
    out: list[Synset] = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split(" ")
            if not sep or len(fields) < 5:
                continue
            definition = wordnet_definition(gloss)
            if definition:
                lemma = fields[4].replace("_", " ")
                out.append(
                    Synset(
                        int(fields[1]),
                        lemma,
                        definition,
                        int(fields[0]),
                        _hypernyms(fields),
                        wordnet_examples(gloss),
                    )
                )
    return out


def _hypernyms(fields: list[str]) -> tuple[int, ...]:
    """Hypernym offsets from a ``data.noun`` line's fields (``()`` if it has none or is odd)."""
    try:
        words = int(fields[3], 16)
        count_at = 4 + 2 * words
        pointers = int(fields[count_at])
        out = []
        for k in range(pointers):
            symbol, offset = fields[count_at + 1 + 4 * k], fields[count_at + 2 + 4 * k]
            if symbol in ("@", "@i"):
                out.append(int(offset))
        return tuple(out)
    except (IndexError, ValueError):
        return ()


def wordnet_categories(cfg: DataConfig, *, at_least: int) -> list[str]:
    """The categories ``label-names`` picks (default all 8), in the given order."""
    names = cfg.labels or list(WORDNET_CATEGORIES.values())
    known = set(WORDNET_CATEGORIES.values())
    if any(n not in known for n in names) or len(names) < at_least:
        raise ConfigError(
            f"`label-names` is {cfg.label_names!r}; with the WordNet data it must name at "
            f"least {at_least} of: {', '.join(WORDNET_CATEGORIES.values())}."
        )
    return names


def default_label_names(cfg: DataConfig) -> list[str]:
    """``label-names`` as configured, else the default data's: all 8 WordNet categories.

    With the user's own data (``data-path``) nothing is assumed: its labels come
    from the file, and a party that cannot read it (the server) needs them set.
    """
    if cfg.labels or cfg.data_path:
        return list(cfg.labels)
    return list(WORDNET_CATEGORIES.values())


def sample_by_category(
    cfg: DataConfig, names: list[str], *, seed: int, synsets: Sequence[Synset] | None = None
) -> list[tuple[int, Synset]]:
    """``(category index, synset)``: ``examples-per-label`` per category (0: all), seeded.

    Within a category the drawn synsets keep their file order. ``synsets``: the
    caller's :func:`read_wordnet` result, so a caller that needs the whole tree too
    reads ``data.noun`` once (default: read it here).
    """
    by_name = {name: lexfile for lexfile, name in WORDNET_CATEGORIES.items()}
    pools: dict[int, list[Synset]] = {by_name[n]: [] for n in names}
    for synset in read_wordnet(Path(cfg.wordnet_dir)) if synsets is None else synsets:
        if synset.lexfile in pools:
            pools[synset.lexfile].append(synset)
    rng = np.random.default_rng(seed)
    out: list[tuple[int, Synset]] = []
    for label, name in enumerate(names):
        pool = pools[by_name[name]]
        take = len(pool) if cfg.examples_per_label == 0 else min(cfg.examples_per_label, len(pool))
        out.extend((label, pool[i]) for i in sorted(rng.choice(len(pool), take, replace=False)))
    return out


def load_wordnet(cfg: DataConfig, *, seed: int) -> LabelledData:
    """WordNet noun definitions labelled by category (``label-names`` picks >= 2)."""
    names = wordnet_categories(cfg, at_least=2)
    drawn = sample_by_category(cfg, names, seed=seed)
    return LabelledData([s.definition for _, s in drawn], [label for label, _ in drawn], names)


def read_table(path: Path) -> Any:
    """Load a CSV / JSONL file or a saved HF dataset as a ``datasets.Dataset``."""
    import datasets  # heavy import

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(
                f"`data-path` {str(path)!r} is a directory but not a dataset written by "
                f"`Dataset.save_to_disk`: {err}"
            ) from err
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ConfigError(
                    f"`data-path` {str(path)!r} holds splits {list(loaded)}; fedtune needs "
                    "a single Dataset or a 'train' split (clients make their own test split)."
                )
            loaded = loaded["train"]
        return loaded
    suffix = path.suffix.lower()
    readers = {".csv": datasets.Dataset.from_csv, ".jsonl": datasets.Dataset.from_json}
    reader = readers.get(".jsonl" if suffix == ".json" else suffix)
    if reader is not None:
        check_readable(path)
        kind = "CSV" if suffix == ".csv" else "JSON lines"
        with tempfile.TemporaryDirectory(prefix="fedtune-utf8-") as tmp:
            # The arrow table lands in the datasets cache: the copy may go at once.
            try:
                table = reader(str(utf8_file(path, Path(tmp) / path.name)))
            except Exception as err:  # noqa: BLE001 - datasets wraps pandas/arrow errors
                if _no_rows(err):
                    raise ConfigError(_header_only(path, kind)) from None
                raise ConfigError(
                    f"`data-path` {str(path)!r} is not a readable {kind} file: "
                    f"{_root_cause(err)}. "
                    + (
                        "Check its quoting and delimiters (comma-separated, with a header "
                        "row such as `text,label`)."
                        if kind == "CSV"
                        else "Each line must be one JSON object, e.g. "
                        '{"text": "...", "label": "..."}.'
                    )
                ) from None
        if len(table) == 0:
            raise ConfigError(_header_only(path, kind))
        return table
    raise ConfigError(
        f"`data-path` {str(path)!r} must be a .csv or .jsonl file or a saved Hugging "
        "Face dataset directory."
    )


def check_readable(path: Path) -> None:
    """One line for a data file that cannot be opened or is empty (before ``datasets``)."""
    try:
        with path.open("rb") as fh:
            first = fh.read(1)
    except OSError as err:
        raise ConfigError(
            f"cannot read `data-path` {str(path)!r}: {err.strerror or err}; give the user "
            "running fedtune read access (e.g. `chmod a+r`), or point `data-path` at a copy."
        ) from None
    if not first:
        raise ConfigError(
            f"`data-path` {str(path)!r} is empty (0 bytes); expected a header row such as "
            "`text,label` and one row per example."
        )


def _header_only(path: Path, kind: str) -> str:
    return (
        f"`data-path` {str(path)!r} has no examples (a {kind} file with a header and no "
        "rows?); add one row per example."
    )


def _no_rows(err: BaseException) -> bool:
    """Whether ``datasets`` failed because the file holds no rows (a header only)."""
    return "corresponds to no data" in str(err)


def _root_cause(err: BaseException) -> str:
    """The innermost cause's first line (pandas' or arrow's message, not datasets')."""
    while err.__cause__ is not None or (
        err.__context__ is not None and not err.__suppress_context__
    ):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def utf8_file(path: Path, spare: Path) -> Path:
    """``path`` if it is valid UTF-8, else a copy at ``spare`` with U+FFFD for bad bytes.

    A record of bytes that are not UTF-8 is read as one record (with replacement
    characters), never as a failure of the whole file: what a node sends must not
    depend on one record's contents (issue 26), and its errors are read by the server.
    (``datasets``' own ``encoding_errors`` is dropped for pandas 2.0--2.2.)
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        return path
    except UnicodeDecodeError:
        pass
    with (
        path.open(encoding="utf-8", errors="replace", newline="") as src,
        spare.open("w", encoding="utf-8", newline="") as dst,
    ):
        while text := src.read(1 << 20):
            dst.write(text)
    return spare


def load_table(cfg: DataConfig) -> LabelledData:
    """Load the user's own data set and map its labels to integers."""
    path = Path(cfg.data_path).expanduser()
    if not path.exists():
        raise ConfigError(f"`data-path` {cfg.data_path!r} does not exist.")
    table = read_table(path)
    for key, column in (("text-column", cfg.text_column), ("label-column", cfg.label_column)):
        if column not in table.column_names:
            raise ConfigError(
                f"`{key}` is {column!r}, but {str(path)!r} has no such column; its "
                f"columns are: {', '.join(table.column_names)}."
            )
    texts = [str(t) for t in table[cfg.text_column]]
    raw = list(table[cfg.label_column])
    if any(v is None for v in raw):
        raise ConfigError(f"Column {cfg.label_column!r} in {str(path)!r} has empty labels.")
    found = {str(v) for v in raw}
    if cfg.labels:
        extra = sorted(found - set(cfg.labels))
        if extra:
            raise ConfigError(
                f"Column {cfg.label_column!r} in {str(path)!r} has labels {extra[:5]} that "
                f"`label-names` ({cfg.label_names!r}) does not list."
            )
        names = cfg.labels
    else:
        names = sorted(found, key=lambda s: (len(s), s) if s.isdigit() else (0, s))
    if len(names) < 2:
        raise ConfigError(
            f"Column {cfg.label_column!r} in {str(path)!r} has {len(names)} distinct "
            "label(s); classification needs at least 2."
        )
    index = {n: i for i, n in enumerate(names)}
    return LabelledData(texts, [index[str(v)] for v in raw], names)


@process_memo(data_key, maxsize=4)
def load_data(cfg: DataConfig, *, seed: int) -> LabelledData:
    """Load the configured data set, capped at ``max-examples`` (seeded).

    Loaded once per process and configuration (:mod:`fedtune.data.memo`): every
    client of a simulation worker gets the same (read-only) object.
    """
    data = load_wordnet(cfg, seed=seed) if not cfg.data_path else load_table(cfg)
    if cfg.max_examples and len(data) > cfg.max_examples:
        keep = sorted(
            np.random.default_rng(seed).choice(len(data), cfg.max_examples, replace=False)
        )
        data = LabelledData(
            [data.texts[i] for i in keep], [data.labels[i] for i in keep], data.label_names
        )
    return data
