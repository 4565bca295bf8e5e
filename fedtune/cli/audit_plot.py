"""The ε plot of ``fedtune audit``: cumulative ε per round, one line per client.

Clients of one run usually spend ε alike (same σ, q and steps): their curves coincide.
Identical curves are drawn once and labelled with every client they stand for
("client-0, …, client-3: 4 clients, identical"); distinct curves get distinct markers
and line styles, so none hides another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fedtune.cli.audit_inputs import Ledger
from fedtune.cli.audit_provenance import LABEL
from fedtune.errors import ConfigError
from fedtune.privacy.audit import AuditReport

__all__ = ["group_identical", "plot_epsilon", "wrap_settings"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINES = ("-", "--", "-.", ":")


def _series(ledgers: Sequence[Ledger]) -> tuple[list[tuple[str, list[float], list[float]]], bool]:
    """``(label, rounds, ε)`` per client and level, and whether all come from one run."""
    one_run = all(len({r.run_id for r in led.records}) == 1 for led in ledgers)
    series: list[tuple[str, list[float], list[float]]] = []
    for led in ledgers:
        for client, level in dict.fromkeys((r.client, r.level) for r in led.records):
            recs = [r for r in led.records if (r.client, r.level) == (client, level)]
            xs = [float(r.round) if one_run else float(i + 1) for i, r in enumerate(recs)]
            ys = [r.epsilon if math.isfinite(r.epsilon) else math.nan for r in recs]
            series.append((f"{client} ({level})", xs, ys))
    return series, one_run


def group_identical(
    series: Sequence[tuple[str, list[float], list[float]]],
) -> list[tuple[list[str], list[float], list[float]]]:
    """Merge series whose points agree to 6 significant digits, keeping first-seen order."""
    groups: dict[tuple[tuple[float, ...], tuple[str, ...]], list[str]] = {}
    data: dict[tuple[tuple[float, ...], tuple[str, ...]], tuple[list[float], list[float]]] = {}
    for label, xs, ys in series:
        key = (tuple(xs), tuple(f"{y:.6g}" for y in ys))
        groups.setdefault(key, []).append(label)
        data.setdefault(key, (xs, ys))
    return [(labels, *data[key]) for key, labels in groups.items()]


def wrap_settings(settings: str, width: int = 62) -> str:
    """``settings`` broken at its " · " separators into lines of at most ``width``."""
    lines: list[str] = []
    for part in settings.split(" · "):
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return "\n".join(lines)


def _group_label(labels: Sequence[str]) -> str:
    if len(labels) == 1:
        return labels[0]
    names = ", ".join(labels) if len(labels) <= 3 else f"{labels[0]}, …, {labels[-1]}"
    return f"{names}: {len(labels)} clients, identical"


def plot_epsilon(
    ledgers: Sequence[Ledger], report: AuditReport, path: Path, *, settings: str = ""
) -> None:
    """Write reported ε per round per client, final deciding ε, budget as dashes.

    ``settings``: the run's settings in one line (task, model, clients, rounds, DP,
    encryption), shown under the title.
    """
    import matplotlib  # slow to import; only when a plot is asked for

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series, one_run = _series(ledgers)
    audits = {f"{c.client} ({c.level})": c for c in report.clients}
    groups = group_identical(series)

    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    legend = len(groups) <= 12
    for i, (labels, xs, ys) in enumerate(groups):
        bad = [
            f"{label} — {audits[label].verdict}"
            for label in labels
            if label in audits and audits[label].verdict != "ok"
        ]
        text = _group_label(labels) + ("; " + "; ".join(bad) if bad else "")
        (line,) = ax.plot(
            xs,
            ys,
            marker=_MARKERS[i % len(_MARKERS)],
            ls=_LINES[(i // len(_MARKERS)) % len(_LINES)],
            ms=5,
            label=text if legend else None,
        )
        proven = [audits[label].epsilon_proven for label in labels if label in audits]
        for value in dict.fromkeys(v for v in proven if math.isfinite(v)):
            ax.plot(xs[-1], value, "x", ms=9, mew=2, color=line.get_color())
    names = "/".join(sorted({LABEL.get(c.accountant, c.accountant) for c in report.clients}))
    ax.plot([], [], "x", ms=9, mew=2, color="0.4", label=f"recomputed {names} ε (final; decides)")
    if report.budget_epsilon is not None:
        ax.axhline(
            report.budget_epsilon,
            ls="--",
            color="crimson",
            label=f"budget ε={report.budget_epsilon:g}",
        )
    n = len(series)
    title = f"ε spent per client ({n} client{'' if n == 1 else 's'}"
    title += f", {len(groups)} distinct)" if len(groups) < n else ")"
    ax.set_title(title + ("\n" + wrap_settings(settings) if settings else ""), fontsize=9)
    ax.set(
        xlabel="round" if one_run else "ledger record (all runs, in file order)",
        ylabel="cumulative ε (reported)",
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")  # cumulative curves leave it empty
    if one_run:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise ConfigError(f"cannot write the plot to {str(path)!r}: {err}") from err
    finally:
        plt.close(fig)
