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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line (the file is created on first use).

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
    line = json.dumps(record, sort_keys=False, allow_nan=False)
    with Path(path).open("a") as fh:
        fh.write(line + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``, in order."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_metrics(
    records: Sequence[Mapping[str, Any]], path: Path, *, headline: Headline | None = None
) -> None:
    """Write the task's headline metric, loss and (when present) ε per round to a PNG.

    ``headline``: the task's (:attr:`fedtune.tasks.base.Task.headline`); default
    held-out accuracy.
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
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4), constrained_layout=True)
    ax_acc, ax_loss = axes[0], axes[1]
    ax_acc.plot(rounds, [r.get(key, math.nan) for r in records], "o-", label="weighted")
    clients = sorted({c for r in records for c in r.get("clients", {})})
    for c in clients:
        ys = [r.get("clients", {}).get(c, {}).get(key, math.nan) for r in records]
        ax_acc.plot(rounds, ys, ".", alpha=0.45, label=c if len(clients) <= 8 else None)
    ax_acc.set(title=headline.title, xlabel="round")
    if headline.ylim is not None:
        ax_acc.set(ylim=headline.ylim)
    ax_acc.legend(fontsize=7)
    ax_loss.plot(rounds, [r.get("eval-loss", math.nan) for r in records], "o-", label="eval")
    if any("train-loss" in r for r in records):  # DP clients send no training statistic
        ax_loss.plot(
            rounds, [r.get("train-loss", math.nan) for r in records], "s--", label="train (local)"
        )
    ax_loss.set(title="loss", xlabel="round")
    ax_loss.legend(fontsize=7)
    if has_eps:
        axes[2].plot(rounds, [r.get("epsilon", math.nan) for r in records], "o-")
        axes[2].set(title="ε spent (max over clients)", xlabel="round")
    for ax in axes:
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
