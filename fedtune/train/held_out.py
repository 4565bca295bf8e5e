"""A node's held-out split, kept in its state directory: once held out, never trained on.

The split itself is a function of the node's data (:func:`fedtune.data.client_split`:
the examples whose contents hash lowest), so it is the same in every run and under
every seed. A node's data file can still change between runs (rows appended or
removed), and then the ranking moves examples. A node with a ``STATE_DIR`` therefore
keeps ``STATE_DIR/held-out.json``: a digest of every tokenised row of its held-out
and its training split as first built. A later build that would train on a row held
out before (and not trained on before) is refused with a :class:`ConfigError` naming
the file; new rows are fine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError
from fedtune.run.files import read_private, write_private

__all__ = ["HELD_OUT_FILE", "check_held_out", "row_digests"]

HELD_OUT_FILE = "held-out.json"
_MAX_BYTES = 256 << 20


def row_digests(rows: Any) -> set[str]:
    """A 128-bit digest (hex) of each row of a tokenised dataset (its tensors' bytes)."""
    out = set()
    for i in range(len(rows)):
        h = hashlib.sha256()
        for key, value in sorted(rows[i].items()):
            h.update(key.encode())
            h.update(value.detach().cpu().numpy().tobytes())
        out.add(h.hexdigest()[:32])
    return out


def _load(path: Path) -> tuple[set[str], set[str]] | None:
    raw = read_private(path, _MAX_BYTES, error=ConfigError)
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        test, train = body["test"], body["train"]
        if not all(isinstance(d, str) and len(d) == 32 for d in [*test, *train]):
            raise ValueError("a digest is not 32 hex characters")
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{str(path)!r} is not a held-out split fedtune wrote ({err}); restore it from a "
            "backup, or remove it to fix the current split as this node's held-out split."
        ) from err
    return set(test), set(train)


def _dump(test: Iterable[str], train: Iterable[str]) -> bytes:
    return json.dumps({"test": sorted(test), "train": sorted(train)}).encode()


def check_held_out(state_dir: Path, *, test_set: Any, train_set: Any) -> None:
    """Keep (first build) or check (later builds) this node's held-out split.

    Raises
    ------
    ConfigError
        The training split now holds rows that were held out, and not trained on, when
        the split was first fixed (the data file or the policy's ``test_fraction``
        changed).
    """
    path = state_dir / HELD_OUT_FILE
    test, train = row_digests(test_set), row_digests(train_set)
    kept = _load(path)
    if kept is None:
        write_private(path, _dump(test, train))
        return
    old_test, old_train = kept
    moved = (old_test & train) - old_train
    if moved:
        raise ConfigError(
            f"{len(moved)} example(s) this node held out for evaluation when it fixed its split "
            f"({str(path)!r}) would now be trained on: its data or its policy's `test_fraction` "
            "changed. Restore them (or the fraction), or remove that file to fix a new split "
            "(their evaluations stay in the ledger)."
        )
    # new rows join the record (so that a later change cannot move them either)
    if not (test <= old_test and train <= old_train):
        write_private(path, _dump(old_test | test, old_train | train))
