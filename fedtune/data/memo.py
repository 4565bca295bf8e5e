"""Whole-data-set work done once per process: reading and partitioning, memoised.

A simulation worker serves many clients of one data set in turn. Reading the
data set and running the partitioner over *all* partitions is the same work for
each of them (and, partitioning being ``O(num-clients)``, a federation of ``K``
clients did ``O(K^2)`` work), so :func:`process_memo` keeps the last few results
per process. The memo is empty until the first call (nothing happens at import),
and is bounded (``maxsize`` entries, least recently used dropped first).

Results are shared between callers: they must treat them as read-only (every
caller in fedtune copies what it selects). A key that names a file includes the
file's size and modification time, so a file rewritten in place is read again.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from fedtune.config import DataConfig

__all__ = ["clear_process_memos", "data_key", "file_stamp", "process_memo"]

P = ParamSpec("P")
R = TypeVar("R")

_CLEARERS: list[Callable[[], None]] = []


def file_stamp(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``(path, size, mtime_ns)`` of a file, or ``(path, -1, -1)`` when it does not exist."""
    try:
        stat = Path(path).expanduser().stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), stat.st_size, stat.st_mtime_ns)


def data_key(cfg: DataConfig, *, seed: int) -> tuple[object, ...]:
    """The memo key of a whole data set: its config, seed and source file's stamp."""
    source = cfg.data_path or str(Path(cfg.wordnet_dir) / "data.noun")
    return (cfg, seed, file_stamp(source))


def process_memo(
    key: Callable[P, Hashable], *, maxsize: int = 4
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Memoise a function per process under ``key(*args, **kwargs)`` (an LRU of ``maxsize``).

    Exceptions are not memoised: a failing call fails again the next time.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        entries: OrderedDict[Hashable, Any] = OrderedDict()

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            k = key(*args, **kwargs)
            if k in entries:
                entries.move_to_end(k)
                return entries[k]  # type: ignore[no-any-return]
            value = fn(*args, **kwargs)
            entries[k] = value
            while len(entries) > maxsize:
                entries.popitem(last=False)
            return value

        wrapper.cache_clear = entries.clear  # type: ignore[attr-defined]
        _CLEARERS.append(entries.clear)
        return wrapper

    return decorate


def clear_process_memos() -> None:
    """Forget every memoised result in this process (tests; a data set changed in place)."""
    for clear in _CLEARERS:
        clear()
