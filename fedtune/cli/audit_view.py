"""How ``fedtune audit`` shows its findings: a terminal table, JSON, a plot, an HTML page.

Nothing here decides a verdict; it renders an :class:`~fedtune.privacy.audit.AuditReport`
and the canaries' bounds (:mod:`fedtune.cli.audit_empirical`) as they were computed.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fedtune.cli.audit_empirical import worst
from fedtune.cli.audit_inputs import Budget, Ledger, RunFacts
from fedtune.cli.audit_report import write_report
from fedtune.errors import ConfigError
from fedtune.privacy.audit import AuditReport

__all__ = [
    "print_canaries_json",
    "print_empirical",
    "print_json",
    "print_table",
    "plot_epsilon",
    "report_page",
    "summary_line",
]


def print_json(
    report: AuditReport,
    *,
    sources: Sequence[Path],
    empirical: dict[str, dict[str, object]],
    path: Path,
    files: Sequence[Path],
    budget: Budget,
    facts: RunFacts,
    plot: Path | None,
    notes: Sequence[str],
) -> None:
    """Print the machine-readable report of an audit with ledgers to stdout."""
    out = report.to_dict()
    for entry, source in zip(out["clients"], sources, strict=True):
        entry["ledger"] = str(source)
        if entry["level"] == "example" and entry["client"] in empirical:
            entry["empirical"] = empirical[entry["client"]]
    if empirical:
        out["empirical"] = worst(empirical)
    out.update(
        path=str(path),
        ledgers=[str(f) for f in files],
        budget_source=budget.source,
        delta_source=facts.delta_source,
        plot=None if plot is None else str(plot),
        warnings=list(notes),
    )
    print(json.dumps(out, indent=1))


def print_canaries_json(path: Path, empirical: dict[str, dict[str, object]]) -> None:
    """Print the machine-readable report of a canary run without ledgers (no DP)."""
    out = {"path": str(path), "clients": [], "empirical": worst(empirical)}
    out["canary-clients"] = empirical  # type: ignore[assignment]
    print(json.dumps(out, indent=1))


def _eps(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _values(values: Sequence[float]) -> str:
    if len(values) <= 3:
        return ", ".join(f"{v:g}" for v in values)
    return f"{min(values):g}..{max(values):g} ({len(values)} values)"


_VERDICT_STYLE = {
    "ok": "green",
    "under-reported": "bold red",
    "overrun": "bold red",
    "inconsistent": "bold red",
}


def print_table(
    report: AuditReport,
    *,
    path: Path,
    files: Sequence[Path],
    budget: Budget,
    facts: RunFacts,
    plot: Path | None,
) -> None:
    """Print one row per client and ledger, then the verdict, budget, δ and plot."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: never squash or cut the columns
        console = Console(width=max(console.width, 160))
    table = Table(title=f"fedtune audit: {path} ({_plural(len(files), 'ledger')})")
    for col in ("client", "level", "relation", "noise", "rounds", "steps", "σ", "q", "δ"):
        table.add_column(
            col, justify="left" if col in ("client", "level", "relation", "noise") else "right"
        )
    for col in ("reported ε", "RDP ε", "PRV ε", "budget", "verdict"):
        table.add_column(col, justify="left" if col == "verdict" else "right", no_wrap=True)
    for c in report.clients:
        style = _VERDICT_STYLE.get(c.verdict, "")
        table.add_row(
            c.client,
            c.level,
            c.relation,
            c.noise if c.noise == "csprng" else f"[bold yellow]{c.noise}: not for real data[/]",
            str(c.rounds),
            str(c.total_steps),
            _values(c.noise_multipliers),
            _values(c.sample_rates),
            f"{c.delta:g}",
            _eps(c.reported_epsilon),
            _eps(c.epsilon_rdp),
            _eps(c.epsilon_prv),
            _eps(c.budget_epsilon),
            f"[{style}]{c.verdict}[/]" if style else c.verdict,
        )
    console.print(table)
    verdicts = [c.verdict for c in report.clients]
    clients = _plural(len(verdicts), "client")
    if report.ok:
        head = f"audit ok: all {clients} ok"
    else:
        counts = ", ".join(
            f"{verdicts.count(v)} {v}"
            for v in ("overrun", "under-reported", "inconsistent")
            if v in verdicts
        )
        head = f"audit FAILED: {counts} of {clients}"
    if budget.epsilon is None:
        budget_text = f"budget NOT checked ({budget.source})"
    else:
        budget_text = f"budget ε={budget.epsilon:g} from {budget.source}"
    tail = f"; plot {plot}" if plot is not None else ""
    delta_text = (
        f"δ={facts.delta:g} from {facts.delta_source}"
        if facts.delta is not None
        else f"δ NOT fixed ({facts.delta_source})"
    )
    console.print(
        f"{head}; {budget_text}; {delta_text}; tolerance {report.tolerance:g}{tail}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def print_empirical(empirical: dict[str, dict[str, object]]) -> None:
    """Print the canaries' lower bounds beside the claimed ε, one row per client."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    table = Table(title="empirical lower bounds (one-run audit, Steinke, Nasr & Jagielski 2023)")
    for col in ("client", "canaries", "rounds", "right / guesses", "δ", "confidence"):
        table.add_column(col, justify="left" if col == "client" else "right")
    for col in ("empirical ε ≥", "claimed ε", "verdict"):
        table.add_column(col, justify="left" if col == "verdict" else "right", no_wrap=True)
    for client, e in empirical.items():
        claimed = e["epsilon-claimed"]
        table.add_row(
            client,
            str(e["canaries"]),
            str(e["rounds"]),
            f"{e['correct']} / {e['guesses']}",
            f"{e['delta']:g}",  # type: ignore[str-format]
            f"{e['confidence']:g}",  # type: ignore[str-format]
            f"{float(e['epsilon-lower-bound']):.3f}",  # type: ignore[arg-type]
            "∞ (no DP)" if claimed == "inf" else f"{float(claimed):.3f}",  # type: ignore[arg-type]
            "[bold red]refuted[/]" if e["refuted"] else "consistent",
        )
    console.print(table)
    refuted = [client for client, e in empirical.items() if e["refuted"]]
    if refuted:
        console.print(
            f"audit FAILED: the canaries refute the claimed ε of {', '.join(refuted)}",
            highlight=False,
            markup=False,
        )


def summary_line(report: AuditReport | None, refuted: Sequence[str]) -> str:
    """The one-line verdict at the top of the HTML page."""
    if report is None:
        head = "no privacy ledger (dp = off): claimed ε = ∞"
    else:
        verdicts = [c.verdict for c in report.clients]
        bad = [f"{verdicts.count(v)} {v}" for v in ("overrun", "under-reported", "inconsistent")]
        bad = [b for b in bad if not b.startswith("0 ")]
        head = (
            f"audit ok: all {_plural(len(verdicts), 'client')} ok"
            if report.ok
            else f"audit FAILED: {', '.join(bad)} of {_plural(len(verdicts), 'client')}"
        )
    if refuted:
        who = ", ".join(refuted)
        if head.startswith("audit ok"):
            head = "audit FAILED: the ledgers add up" + head.removeprefix("audit ok")
        head += f"; but the canaries refute the claimed ε of {who}"
    return head


def report_page(
    out: Path,
    path: Path,
    *,
    report: AuditReport | None,
    empirical: dict[str, dict[str, object]],
    ledgers: Sequence[Ledger],
    notes: Sequence[str],
    refuted: Sequence[str],
) -> None:
    """Write the HTML page of ``--report`` to ``out`` (the plot embedded) and say so."""
    png: bytes | None = None
    if report is not None and ledgers:
        with tempfile.TemporaryDirectory() as tmp:
            plot_epsilon(ledgers, report, Path(tmp) / "epsilon.png")
            png = (Path(tmp) / "epsilon.png").read_bytes()
    write_report(
        out,
        source=path,
        report=report,
        empirical=empirical,
        plot_png=png,
        summary=summary_line(report, refuted),
        notes=notes,
    )
    print(f"fedtune audit: report {out}", file=sys.stderr)


def plot_epsilon(ledgers: Sequence[Ledger], report: AuditReport, path: Path) -> None:
    """Write reported ε per round per client, final recomputed PRV ε, budget as dashes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    one_run = all(len({r.run_id for r in led.records}) == 1 for led in ledgers)
    series: list[tuple[str, list[float], list[float]]] = []
    for led in ledgers:
        keys = dict.fromkeys((r.client, r.level) for r in led.records)
        for client, level in keys:
            recs = [r for r in led.records if (r.client, r.level) == (client, level)]
            xs = (
                [float(r.round) for r in recs]
                if one_run
                else [float(i + 1) for i in range(len(recs))]
            )
            ys = [r.epsilon if math.isfinite(r.epsilon) else math.nan for r in recs]
            series.append((f"{client} ({level})", xs, ys))
    audits = {f"{c.client} ({c.level})": c for c in report.clients}

    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    legend = len(series) <= 12
    for label, xs, ys in series:
        audit = audits.get(label)
        verdict = "" if audit is None or audit.verdict == "ok" else f" — {audit.verdict}"
        (line,) = ax.plot(xs, ys, "o-", ms=4, label=label + verdict if legend else None)
        if audit is not None and math.isfinite(audit.epsilon_prv):
            ax.plot(xs[-1], audit.epsilon_prv, "x", ms=9, mew=2, color=line.get_color())
    ax.plot([], [], "x", ms=9, mew=2, color="0.4", label="recomputed PRV ε (final)")
    if report.budget_epsilon is not None:
        ax.axhline(
            report.budget_epsilon,
            ls="--",
            color="crimson",
            label=f"budget ε={report.budget_epsilon:g}",
        )
    ax.set(
        title=f"ε spent per client ({_plural(len(series), 'client')})",
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
