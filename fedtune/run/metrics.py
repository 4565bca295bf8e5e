"""Per-round metrics: the ``metrics.jsonl`` records, their plot and summary table.

Each line of ``metrics.jsonl`` is one round (round 0 is the initial adapter)::

    {"round": 1, "train-seconds": 21.3, "eval-seconds": 3.1, "round-seconds": 24.4,
     "clients-trained": 4, "clients-dropped": 0, "train-loss": 1.2,
     "eval-loss": 0.61, "eval-accuracy": 0.83, "eval-examples": 400,
     "clients": {"client-0": {"train-loss": ..., "eval-loss": ..., "eval-accuracy": ...,
                              "num-examples": ..., "eval-examples": ...}}}

Weighted values are weighted by each client's example count. Keys are
kebab-case like the config keys. Every number in the file is finite: the server
drops a non-finite or absurd metric before it gets here (:mod:`fedtune.apps.server.replies`),
and :func:`append_record` refuses one (strict JSON has no ``Infinity`` or ``NaN``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtune.errors import MetricsFileError
from fedtune.tasks.base import Headline


def weighted_mean(pairs: Sequence[tuple[float, int]]) -> float:
    """``sum v_k n_k / sum n_k`` over finite values; NaN when nothing counts.

    Computed as ``sum v_k (n_k / N)`` (``math.fsum``): a convex combination of finite
    values, so it cannot overflow to ``inf`` as ``v_k n_k`` can (1.7e308 x 2).
    """
    good = [(v, n) for v, n in pairs if n > 0 and math.isfinite(v)]
    total = sum(n for _, n in good)
    return math.fsum(v * (n / total) for v, n in good) if total else math.nan


def _non_finite(value: Any, where: str) -> tuple[str, float] | None:
    """The key path and value of the first non-finite number in ``value``, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items: list[tuple[str, Any]] = []
    if isinstance(value, Mapping):
        items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    for path, item in items:
        found = _non_finite(item, path)
        if found is not None:
            return found
    return None


#: ANSI escape sequences (colours, cursor moves) a library may put in an error text.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
#: The longest text value kept in a record (a reason, a cause).
MAX_TEXT = 300


def clean_text(text: str) -> str:
    """A text value fit for ``metrics.jsonl``: one line, no ANSI codes, no trace.

    A client's error reason arrives through Flower and Ray as the repr of a Ray
    exception, with its colours and the actor's whole trace; the record keeps the
    first line before any trace or actor repr, at most :data:`MAX_TEXT` characters (the
    trace is in the simulation's ``clients.log``, or the node's own log).
    """
    text = _ANSI.sub("", text)
    for marker in ("Traceback (most recent call last)", "ray::"):
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut].rstrip(" :<'(") + " (trace in the client's log)"
    lines = text.strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= MAX_TEXT else line[: MAX_TEXT - 1] + "…"


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line (the file is created on first use).

    Text values pass through :func:`clean_text` (one line, no ANSI codes, no trace).
    The line is written with one ``write`` call, so a run stopped at any moment
    leaves whole lines only.

    Raises
    ------
    ValueError
        If a number in ``record`` is ``inf`` or ``NaN`` (named by its key path):
        ``metrics.jsonl`` holds strict JSON, finite numbers only.
    """
    bad = _non_finite(record, "")
    if bad is not None:
        raise ValueError(
            f"metrics record key {bad[0]!r} is {bad[1]!r}; metrics.jsonl holds finite numbers "
            "only: leave the value out (the server drops non-finite metrics)."
        )
    line = json.dumps(_clean(record), sort_keys=False, allow_nan=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``, in order.

    Raises
    ------
    MetricsFileError
        One line naming the file and the line that is not a JSON object with a
        ``round`` (a file edited by hand, cut short, or not a metrics file at all),
        or a file that cannot be read.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise MetricsFileError(
            f"cannot read {str(path)!r}: {err.strerror or err}; check that the file exists "
            "and that you may read it."
        ) from err
    except UnicodeDecodeError as err:
        raise MetricsFileError(
            f"{str(path)!r} is not UTF-8 text (byte {err.start}); it is not a metrics.jsonl "
            "fedtune wrote: restore it from the run, or run the federation again."
        ) from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise MetricsFileError(
                f"{str(path)!r} line {number} is not a metrics record (a JSON object with a "
                f"'round'): {line[:80]!r}; restore the file from the run, or delete that line."
            )
        records.append(record)
    return records


def plot_metrics(
    records: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    headline: Headline | None = None,
    settings: str = "",
    noisy_eval: bool = False,
) -> None:
    """Write the task's headline metric, loss and (when present) ε per round to a PNG.

    ``headline``: the task's (:attr:`fedtune.tasks.base.Task.headline`); default
    held-out accuracy. ``settings``: the run in one line
    (:func:`fedtune.run.card.run_settings`), the figure's title. ``noisy_eval``: the
    held-out metrics are DP releases (``evaluation = "dp"``), so their panels say they
    are noisy (``fedtune evaluate`` gives the exact final numbers).
    """
    import matplotlib  # plotting is optional and slow to import

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    if headline is None:
        headline = Headline("eval-accuracy", "held-out accuracy", (0.0, 1.0))
    key = headline.key
    has_eps = any(r.get("epsilon") is not None for r in records)
    ncols = 3 if has_eps else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.7), constrained_layout=True)
    if settings:
        fig.suptitle(settings, fontsize=9)
    ax_acc, ax_loss = axes[0], axes[1]
    ax_acc.plot(rounds, [r.get(key, math.nan) for r in records], "o-", label="weighted")
    clients = sorted({c for r in records for c in r.get("clients", {})})
    for c in clients:
        ys = [r.get("clients", {}).get(c, {}).get(key, math.nan) for r in records]
        ax_acc.plot(rounds, ys, ".", alpha=0.45, label=c if len(clients) <= 8 else None)
    noisy = "\n(DP releases: noisy)" if noisy_eval else ""
    ax_acc.set(title=headline.title + noisy, xlabel="round")
    if headline.ylim is not None:
        ax_acc.set(ylim=headline.ylim)
    ax_acc.legend(fontsize=7)
    ax_loss.plot(rounds, [r.get("eval-loss", math.nan) for r in records], "o-", label="eval")
    if any("train-loss" in r for r in records):  # DP clients send no training statistic
        ax_loss.plot(
            rounds, [r.get("train-loss", math.nan) for r in records], "s--", label="train (local)"
        )
    ax_loss.set(title="loss" + noisy, xlabel="round")
    ax_loss.legend(fontsize=7)
    if has_eps:
        axes[2].plot(rounds, [r.get("epsilon", math.nan) for r in records], "o-")
        axes[2].set(title="ε spent (max over clients)", xlabel="round")
    for ax in axes:
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
