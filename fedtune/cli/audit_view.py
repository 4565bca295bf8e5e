"""How ``fedtune audit`` shows its findings: a terminal table, JSON, a plot, an HTML page.

Nothing here decides a verdict; it renders an :class:`~fedtune.privacy.audit.AuditReport`
and the canaries' bounds (:mod:`fedtune.cli.audit_empirical`) as they were computed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fedtune.cli.audit_empirical import worst
from fedtune.cli.audit_inputs import Budget, Ledger, RunFacts
from fedtune.cli.audit_plot import plot_epsilon
from fedtune.cli.audit_provenance import (
    LABEL,
    client_facts,
    deciding,
    provenance,
    run_settings_of,
)
from fedtune.cli.audit_report import write_report
from fedtune.privacy.analysis import PRV_EPS_ERROR
from fedtune.privacy.audit import AuditReport

__all__ = [
    "print_canaries_json",
    "print_empirical",
    "print_json",
    "print_table",
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


def _values(values: Sequence[float], fmt: str = "g") -> str:
    if len(values) <= 3:
        return ", ".join(f"{v:{fmt}}" for v in values)
    return f"{min(values):{fmt}}..{max(values):{fmt}} ({len(values)} values)"


_VERDICT_STYLE = {
    "ok": "green",
    "under-reported": "bold red",
    "overrun": "bold red",
    "inconsistent": "bold red",
}


NARROW_WIDTH = 100
"""Width of a piped table (no terminal, no ``COLUMNS``): the narrow table fits it."""

WIDE_WIDTH = 160
"""Width of a piped ``--wide`` table, so no column is squashed."""


def _console(*, wide: bool = False):  # type: ignore[no-untyped-def]
    """A rich console: the terminal's width, else ``COLUMNS``, else 100 (160 with --wide)."""

    from rich.console import Console

    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console = Console(width=WIDE_WIDTH if wide else NARROW_WIDTH)
    return console


def _noise_cell(noise: str) -> str:
    return noise if noise == "csprng" else f"[bold yellow]{noise}: not for real data[/]"


def print_table(
    report: AuditReport,
    *,
    path: Path,
    files: Sequence[Path],
    budget: Budget,
    facts: RunFacts,
    plot: Path | None,
    wide: bool = False,
) -> None:
    """Print one row per client and ledger, then the verdict, budget, δ and plot.

    The default table fits 100 columns (client, rounds, steps, σ, reported ε, the
    deciding ε, budget, verdict; the level when rows differ in it). The deciding ε is
    the one of the accountant proven for the history (``discrete-rdp`` where a discrete
    Gaussian ran, PRV for float Gaussian noise): its column is named after that
    accountant when every row shares it ("discrete-rdp ε", "PRV ε"), else it is
    "deciding ε" with a "by" column. What every row shares (level, relation, δ, noise
    source, the deciding accountant and why) is said once below it. ``wide`` adds the
    level, relation, noise, q, δ, and the continuous-Gaussian RDP and PRV ε of every row.
    """
    from rich.table import Table

    console = _console(wide=wide)
    table = Table(
        title=f"fedtune audit: {path} ({_plural(len(files), 'ledger')})",
        title_justify="left",
    )
    name_width = max([len("client"), *(len(c.client) for c in report.clients)])
    # The client name never wraps or shrinks: it is what a reader looks for.
    table.add_column("client", no_wrap=True, min_width=name_width)
    # One level for every row (the usual case): said once below, a column saved.
    show_level = wide or len({c.level for c in report.clients}) > 1
    if show_level:
        table.add_column("level", no_wrap=True, min_width=len("example"))
    if wide:
        table.add_column("relation")
        table.add_column("noise")
    for col in ("rounds", "steps", "σ") + (("q", "δ") if wide else ()):
        table.add_column(col, justify="right")
    accountants = {c.accountant for c in report.clients}
    single = accountants.pop() if len(accountants) == 1 else None
    # PRV deciding for every row: its column is the deciding one (no duplicate in --wide).
    show_prv = wide and single != "prv"
    show_by = single is None
    eps_cols = ["reported ε", *(["RDP ε"] if wide else []), *(["PRV ε"] if show_prv else [])]
    eps_cols.append("deciding ε" if single is None else f"{LABEL.get(single, single)} ε")
    for col in (*eps_cols, *(["by"] if show_by else []), "budget"):
        table.add_column(col, justify="left" if col == "by" else "right", no_wrap=col == "by")
    table.add_column("verdict", no_wrap=True)
    for c in report.clients:
        style = _VERDICT_STYLE.get(c.verdict, "")
        row = [c.client, c.level] if show_level else [c.client]
        if wide:
            row += [c.relation, _noise_cell(c.noise)]
        sigmas = _values(c.noise_multipliers, "g" if wide else ".4g")
        row += [str(c.rounds), str(c.total_steps), sigmas]
        if wide:
            row += [_values(c.sample_rates), f"{c.delta:g}"]
        row += [_eps(c.reported_epsilon)]
        row += [_eps(c.epsilon_rdp)] if wide else []
        row += [_eps(c.epsilon_prv)] if show_prv else []
        row += [_eps(c.epsilon_proven)]
        row += [c.accountant] if show_by else []
        row += [_eps(c.budget_epsilon)]
        row.append(f"[{style}]{c.verdict}[/]" if style else c.verdict)
        table.add_row(*row)
    console.print(table)
    for line in _footer(report, budget=budget, facts=facts, plot=plot, wide=wide):
        console.print(line, highlight=False, markup=False)


def _deciding_lines(report: AuditReport, *, wide: bool) -> list[str]:
    """Which accountant decided the verdicts and why (the noise its ledgers compose)."""
    groups = deciding(report)
    tolerance = f"tolerance {report.tolerance:g}"
    lines = []
    for g in groups:
        head = (
            f"{g.label} ε decides the verdict"
            if len(groups) == 1
            else f"{g.label} ε decides for {', '.join(g.clients)}"
        )
        if g.accountant == "prv":
            lines.append(
                f"{head}: {g.noise} (PRV exact to ±{PRV_EPS_ERROR:g}; {tolerance}); "
                "RDP ε is a looser cross-check"
            )
        elif g.accountant == "discrete-rdp":
            lines.append(
                f"{head}: {g.noise} ran, and discrete-rdp is the accountant proven "
                f"for every release ({tolerance}); the continuous-Gaussian PRV and RDP ε are "
                "for comparison only"
            )
        else:
            lines.append(f"{head}: {g.noise} ({tolerance})")
    if lines and not wide:
        lines[-1] += " (--wide or --json shows them, with q and δ per row)"
    return lines


def _footer(
    report: AuditReport, *, budget: Budget, facts: RunFacts, plot: Path | None, wide: bool
) -> list[str]:
    """The verdict line, then what every row shares and where the numbers came from."""
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
    delta_text = (
        f"δ={facts.delta:g} from {facts.delta_source}"
        if facts.delta is not None
        else f"δ NOT fixed ({facts.delta_source})"
    )
    relations = ", ".join(sorted({c.relation for c in report.clients}))
    level_set = {c.level for c in report.clients}
    levels = f"{level_set.pop()}-level DP; " if len(level_set) == 1 and not wide else ""
    noises = sorted({c.noise for c in report.clients})
    noise_text = ", ".join(n if n == "csprng" else f"{n} (NOT for real data)" for n in noises)
    lines = [
        f"{head}; {budget_text}",
        f"{delta_text}; {levels}relation {relations}; noise {noise_text}",
        *_deciding_lines(report, wide=wide),
    ]
    if plot is not None:
        lines.append(f"plot {plot}")
    return lines


def print_empirical(empirical: dict[str, dict[str, object]]) -> None:
    """Print the canaries' lower bounds beside the claimed ε, one row per client."""
    from rich.table import Table

    console = _console()
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
    budget: Budget | None = None,
    facts: RunFacts | None = None,
) -> None:
    """Write the HTML page of ``--report`` to ``out`` (the plot embedded) and say so."""
    png: bytes | None = None
    if report is not None and ledgers:
        with tempfile.TemporaryDirectory() as tmp:
            settings = run_settings_of(path) or ""
            plot_epsilon(ledgers, report, Path(tmp) / "epsilon.png", settings=settings)
            png = (Path(tmp) / "epsilon.png").read_bytes()
    prov = None
    if report is not None and budget is not None and facts is not None:
        prov = provenance(path, report=report, ledgers=ledgers, budget=budget, facts=facts)
    write_report(
        out,
        source=path,
        report=report,
        empirical=empirical,
        plot_png=png,
        summary=summary_line(report, refuted),
        notes=notes,
        provenance=prov,
        client_facts=client_facts(ledgers),
        dp_evaluation=any(r.kind == "eval" for led in ledgers for r in led.records),
    )
    print(f"fedtune audit: report {out}", file=sys.stderr)
