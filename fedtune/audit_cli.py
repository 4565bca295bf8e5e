"""``fedtune audit PATH``: recompute every client's ε from its privacy ledger and judge it.

The wiring around :func:`fedtune.privacy.audit.audit_records` (the maths lives there):
find the ledgers under ``PATH``, read them, find the budget, print a table (or JSON) and
a plot, and turn the verdicts into an exit code.

Each ledger file is audited on its own: a record's cumulative ε composes the earlier
records of the same client *in the same file* (see :mod:`fedtune.privacy.ledger`), so
that is the history the audit must recompute to compare like with like.

Exit codes
----------
0  every client's verdict is ``ok``.
1  some client overran the budget, reported less ε than recomputed, or has records
   inconsistent with the audit δ or the run config; or (runs with ``audit-canaries``)
   its canaries prove an ε lower bound above the claimed ε. stderr names the client
   and the numbers.
2  bad input: no such path, no ledger found, an unreadable or corrupt ledger, an
   unusable ``config.toml``. One line ``fedtune audit: error: ...`` on stderr, naming
   the path. :func:`run` returns 2 itself (it never raises for these), so it behaves
   the same whether or not its caller handles :class:`~fedtune.config.ConfigError`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import ConfigError, load_toml, parse_run_config
from fedtune.privacy.audit import AuditReport, ClientAudit, RunExpectation, audit_records
from fedtune.privacy.ledger import LedgerCorruptError, PrivacyLedger
from fedtune.privacy.record import LedgerRecord

__all__ = ["add_parser", "run"]

DEFAULT_TOLERANCE: float = inspect.signature(audit_records).parameters["tolerance"].default
"""The audit's own default (``2 * PRV_EPS_ERROR``); read from it so the two never drift."""

NOT_LEDGERS = frozenset({"metrics.jsonl"})
"""``*.jsonl`` files of a run directory that are not ledgers."""

BUDGET_KEYS = ("target-epsilon", "epsilon-budget")

DESCRIPTION = """\
Recompute every client's ε from its privacy ledger with two independent accountants
(PRV, Gopi et al. 2021, and RDP, Mironov et al. 2019), compare with the ε the client
reported, and check it against the ε budget.

PATH is one of:
  a run directory        ledgers in PATH/privacy/*.jsonl (written by `fedtune simulate`)
  a node's state dir     ledgers in PATH/privacy/*.jsonl or PATH/*.jsonl
  a ledger file          PATH itself (*.jsonl)

ε is recomputed at the run's target δ (PATH/config.toml, or --delta), never at the δ
a record states, under the neighbouring relation the records declare (replace-one:
the client's example count is public).

Verdicts: "overrun" (recomputed PRV ε or reported ε above the budget), "under-reported"
(some record's ε below the PRV ε recomputed for it by more than --tolerance),
"inconsistent" (a record at another δ, or a composition that does not follow from the
recorded batch size, epochs and example count or from the run config), "ok".

Runs made with `audit-canaries = m` also get an empirical lower bound on each client's
ε from its gradient canaries (one-run auditing, Steinke, Nasr & Jagielski 2023; 95%
confidence, 10% of the canaries guessed in and 10% out); a bound above the claimed ε
refutes the claim.
"""

EPILOG = """\
exit status: 0 all clients ok; 1 an overrun or under-reported ε, or canaries that
refute the claimed ε (stderr names the client and the numbers); 2 bad input (missing
path, no ledgers, corrupt ledger).
"""


@dataclass(frozen=True)
class _Budget:
    epsilon: float | None
    source: str
    """Where ``epsilon`` came from, in words (or why there is none)."""


@dataclass(frozen=True)
class _RunFacts:
    delta: float | None
    delta_source: str
    expect: RunExpectation


@dataclass(frozen=True)
class _Ledger:
    path: Path
    records: tuple[LedgerRecord, ...]


def _epsilon_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0.0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"expected a finite ε > 0, got {text!r}")
    return value


def _delta_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(f"expected a δ in (0, 1), got {text!r}")
    return value


def _tolerance_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0.0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"expected a finite tolerance >= 0, got {text!r}")
    return value


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register the ``audit`` subcommand on ``subparsers`` and return its parser."""
    parser = subparsers.add_parser(
        "audit",
        help="recompute every client's ε from the privacy ledgers and check the budget",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path",
        type=Path,
        metavar="PATH",
        help="a run directory, a node's state directory or one .jsonl ledger",
    )
    parser.add_argument(
        "--budget",
        type=_epsilon_arg,
        metavar="EPS",
        help=(
            "the ε no client may exceed (default: `epsilon-budget` from PATH/config.toml, "
            "or `target-epsilon` when that is 0 or absent; with neither, the budget is "
            "not checked and the report says so)"
        ),
    )
    parser.add_argument(
        "--delta",
        type=_delta_arg,
        metavar="DELTA",
        help=(
            "the δ to audit at (default: `target-delta` from PATH/config.toml); records "
            "written at another δ are flagged inconsistent"
        ),
    )
    parser.add_argument(
        "--tolerance",
        type=_tolerance_arg,
        default=DEFAULT_TOLERANCE,
        metavar="EPS",
        help=(
            f"how far a reported ε may sit below the recomputed PRV ε (default "
            f"{DEFAULT_TOLERANCE:g}: the PRV accountant is exact to ±0.01, so two honest "
            "computations of one history can differ by up to 0.02; more is not numerics)"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print a machine-readable report to stdout"
    )
    plot = parser.add_mutually_exclusive_group()
    plot.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help=(
            "write ε per round per client to this PNG (default for a directory: "
            "epsilon.png next to the ledgers, i.e. PATH/privacy/epsilon.png in a run)"
        ),
    )
    plot.add_argument("--no-plot", action="store_true", help="do not write a plot")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FILE.html",
        help="also write one self-contained HTML page (tables, plot, what ε does not cover)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Audit the ledgers under ``args.path``; return the exit code (0, 1 or 2, see module)."""
    try:
        return _run(args)
    except ConfigError as err:
        print(f"fedtune audit: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    path: Path = args.path
    canary_dir = _canary_dir(path)
    try:
        files, ledger_dir = _find_ledgers(path)
    except ConfigError:
        if canary_dir is None:
            raise
        return _canaries_only(args, path, canary_dir)
    ledgers, notes = _read_ledgers(files)
    budget = _find_budget(args.budget, path)
    facts = _run_facts(args.delta, path)
    report, sources = _audit(
        ledgers,
        budget=budget.epsilon,
        delta=facts.delta,
        tolerance=args.tolerance,
        expect=facts.expect,
    )
    notes += _shared_clients(report, sources)
    empirical = _empirical(canary_dir, report, delta=facts.delta)

    plot: Path | None = None
    if not args.no_plot:
        plot = args.plot or (ledger_dir / "epsilon.png" if ledger_dir is not None else None)
    if plot is not None:
        _plot(ledgers, report, plot)

    for note in notes:
        print(f"fedtune audit: warning: {note}", file=sys.stderr)
    if args.json:
        out = report.to_dict()
        for entry, source in zip(out["clients"], sources, strict=True):
            entry["ledger"] = str(source)
            if entry["level"] == "example" and entry["client"] in empirical:
                entry["empirical"] = empirical[entry["client"]]
        if empirical:
            out["empirical"] = _worst(empirical)
        out.update(
            path=str(path),
            ledgers=[str(f) for f in files],
            budget_source=budget.source,
            delta_source=facts.delta_source,
            plot=None if plot is None else str(plot),
            warnings=notes,
        )
        print(json.dumps(out, indent=1))
    else:
        _print_table(report, path=path, files=files, budget=budget, facts=facts, plot=plot)
        if empirical:
            _print_empirical(empirical)
    refuted = _refutations(empirical)
    if args.report is not None:
        _report_page(
            args.report,
            path,
            report=report,
            empirical=empirical,
            ledgers=ledgers,
            notes=notes,
            refuted=refuted,
        )
    for c in report.clients:
        kind = "warning" if c.verdict == "ok" else c.verdict  # ok may still note duplicates
        for problem in c.problems:
            print(
                f"fedtune audit: client {c.client!r} ({c.level}-level) {kind}: {problem}",
                file=sys.stderr,
            )
    return 0 if report.ok and not refuted else 1


# -- empirical lower bounds (audit-canaries) ---------------------------------------------
def _canary_dir(path: Path) -> Path | None:
    """The folder holding ``*.canaries.json`` files under ``path`` (None: none)."""
    if not path.is_dir():
        return None
    for folder in (path / "privacy", path):
        if any(folder.glob("*.canaries.json")):
            return folder
    return None


def _empirical(
    folder: Path | None, report: AuditReport | None, *, delta: float | None
) -> dict[str, dict[str, object]]:
    """Each canary client's ε lower bound beside its claimed ε (∞ without a ledger)."""
    if folder is None:
        return {}
    from fedtune.privacy.canaries import load_canaries  # noqa: PLC0415

    claims = {
        c.client: c.reported_epsilon
        for c in (report.clients if report is not None else ())
        if c.level == "example"
    }
    audit_delta = delta
    if audit_delta is None and report is not None and report.clients:
        audit_delta = report.clients[0].delta
    out: dict[str, dict[str, object]] = {}
    for f in sorted(folder.glob("*.canaries.json")):
        client = f.name.removesuffix(".canaries.json")
        try:
            state = load_canaries(f)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        bound = state.bound(delta=audit_delta if audit_delta is not None else 1e-5)
        claimed = claims.get(client, math.inf)
        out[client] = {
            **bound.to_json(),
            "epsilon-claimed": claimed if math.isfinite(claimed) else "inf",
            "rounds": len(state.rounds),
            "refuted": bound.epsilon_lower_bound > claimed,
            "canary-file": str(f),
        }
    return out


def _worst(empirical: dict[str, dict[str, object]]) -> dict[str, object]:
    """The client whose lower bound comes closest to (or beyond) its claim."""

    def margin(item: tuple[str, dict[str, object]]) -> float:
        claimed = item[1]["epsilon-claimed"]
        bound = float(item[1]["epsilon-lower-bound"])  # type: ignore[arg-type]
        return bound - (math.inf if claimed == "inf" else float(claimed))  # type: ignore[arg-type]

    client, values = max(empirical.items(), key=margin)
    return {"client": client, **values}


def _refutations(empirical: dict[str, dict[str, object]]) -> list[str]:
    """Print (stderr) and return the clients whose lower bound exceeds the claimed ε."""
    refuted = []
    for client, e in empirical.items():
        if e["refuted"]:
            refuted.append(client)
            print(
                f"fedtune audit: client {client!r} refuted: {e['correct']} of {e['guesses']} "
                f"canary guesses right prove ε >= {float(e['epsilon-lower-bound']):.3f} "  # type: ignore[arg-type]
                f"(confidence {e['confidence']}, δ={e['delta']:g}), more than the claimed "  # type: ignore[str-format]
                f"ε = {float(e['epsilon-claimed']):.3f}: the mechanism leaks more than its "  # type: ignore[arg-type]
                "ledger says.",
                file=sys.stderr,
            )
    return refuted


def _print_empirical(empirical: dict[str, dict[str, object]]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

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


def _summary(report: AuditReport | None, refuted: Sequence[str]) -> str:
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


def _report_page(
    out: Path,
    path: Path,
    *,
    report: AuditReport | None,
    empirical: dict[str, dict[str, object]],
    ledgers: Sequence[_Ledger],
    notes: Sequence[str],
    refuted: Sequence[str],
) -> None:
    import tempfile  # noqa: PLC0415

    from fedtune.audit_report import write_report  # noqa: PLC0415

    png: bytes | None = None
    if report is not None and ledgers:
        with tempfile.TemporaryDirectory() as tmp:
            _plot(ledgers, report, Path(tmp) / "epsilon.png")
            png = (Path(tmp) / "epsilon.png").read_bytes()
    write_report(
        out,
        source=path,
        report=report,
        empirical=empirical,
        plot_png=png,
        summary=_summary(report, refuted),
        notes=notes,
    )
    print(f"fedtune audit: report {out}", file=sys.stderr)


def _canaries_only(args: argparse.Namespace, path: Path, folder: Path) -> int:
    """A canary run without DP: no ledgers, only the empirical bound (claimed ε = ∞)."""
    facts = _run_facts(args.delta, path)
    empirical = _empirical(folder, None, delta=facts.delta)
    if args.json:
        out = {"path": str(path), "clients": [], "empirical": _worst(empirical)}
        out["canary-clients"] = empirical  # type: ignore[assignment]
        print(json.dumps(out, indent=1))
    else:
        print(f"fedtune audit: {path}: no privacy ledgers (dp = off); canaries only")
        _print_empirical(empirical)
    if args.report is not None:
        _report_page(
            args.report, path, report=None, empirical=empirical, ledgers=(), notes=(), refuted=[]
        )
    return 0


# -- input ---------------------------------------------------------------------------
def _find_ledgers(path: Path) -> tuple[list[Path], Path | None]:
    """Return the ledger files under ``path`` and the folder holding them (None: a file)."""
    if not path.exists():
        raise ConfigError(
            f"{str(path)!r} does not exist; expected a run directory, a node's state "
            "directory or a .jsonl privacy ledger."
        )
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ConfigError(f"{str(path)!r} is not a .jsonl privacy ledger.")
        return [path], None
    for folder in (path / "privacy", path):
        found = sorted(p for p in folder.glob("*.jsonl") if p.name not in NOT_LEDGERS)
        if found:
            return found, folder
    raise ConfigError(
        f"no privacy ledgers in {str(path)!r}: looked for {str(path / 'privacy')}/*.jsonl "
        f"and {str(path)}/*.jsonl. Was the run made with dp = off?"
    )


def _read_ledgers(files: Sequence[Path]) -> tuple[list[_Ledger], list[str]]:
    """Read every file; a torn last line or an empty file becomes a note, not an error."""
    ledgers: list[_Ledger] = []
    notes: list[str] = []
    for f in files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                records = PrivacyLedger(f).records()
            except LedgerCorruptError as err:
                raise ConfigError(str(err)) from err
            except OSError as err:
                raise ConfigError(f"cannot read privacy ledger {str(f)!r}: {err}") from err
        notes += [str(w.message) for w in caught]
        if records:
            ledgers.append(_Ledger(f, tuple(records)))
        else:
            notes.append(f"privacy ledger {str(f)!r} holds no records; skipped.")
    if not ledgers:
        names = ", ".join(repr(str(f)) for f in files)
        raise ConfigError(f"no ledger records in {names}.")
    return ledgers, notes


def _run_facts(given: float | None, path: Path) -> _RunFacts:
    """The δ to audit at (``--delta``, else the run's ``target-delta``) and what the
    run's ``config.toml`` fixes for every record."""
    config = path / "config.toml"
    flat: dict[str, object] = {}
    if path.is_dir() and config.is_file():
        flat = load_toml(config)
    checked = {k: flat[k] for k in _CHECKED_KEYS if k in flat}
    try:
        cfg = parse_run_config(checked)
    except ConfigError as err:
        raise ConfigError(f"{str(config)!r}: {err}") from err
    expect = RunExpectation(
        batch_size=cfg.train.batch_size if "batch-size" in checked else None,
        local_epochs=cfg.train.local_epochs if "local-epochs" in checked else None,
        max_grad_norm=cfg.privacy.max_grad_norm if "max-grad-norm" in checked else None,
    )
    if given is not None:
        return _RunFacts(given, "--delta", expect)
    if "target-delta" in checked:
        return _RunFacts(cfg.privacy.target_delta, f"target-delta in {config}", expect)
    where = "a single ledger file" if path.is_file() else f"no {str(config)!r}"
    return _RunFacts(None, f"no --delta and {where}", expect)


_CHECKED_KEYS = ("target-delta", "batch-size", "local-epochs", "max-grad-norm")


def _find_budget(given: float | None, path: Path) -> _Budget:
    if given is not None:
        return _Budget(given, "--budget")
    if path.is_file():
        return _Budget(None, "none: no --budget, and a single ledger file has no config.toml")
    config = path / "config.toml"
    if not config.is_file():
        return _Budget(None, f"none: no --budget and no {str(config)!r}")
    flat = load_toml(config)
    keys = {k: flat[k] for k in BUDGET_KEYS if k in flat}
    if not keys:
        return _Budget(None, f"none: no --budget and no {' / '.join(BUDGET_KEYS)} in {config}")
    try:
        budget = parse_run_config(keys).privacy.budget
    except ConfigError as err:
        raise ConfigError(f"{str(config)!r}: {err}") from err
    if keys.get("epsilon-budget"):
        key = "epsilon-budget"
    elif "target-epsilon" in keys:
        key = (
            "target-epsilon (epsilon-budget = 0)" if "epsilon-budget" in keys else "target-epsilon"
        )
    else:
        key = "the default target-epsilon (epsilon-budget = 0)"
    return _Budget(budget, f"{key} in {config}")


# -- audit ---------------------------------------------------------------------------
def _audit(
    ledgers: Sequence[_Ledger],
    *,
    budget: float | None,
    delta: float | None,
    tolerance: float,
    expect: RunExpectation,
) -> tuple[AuditReport, list[Path]]:
    """Audit each ledger on its own (its ε composes only its own records)."""
    clients: list[ClientAudit] = []
    sources: list[Path] = []
    for ledger in ledgers:
        try:
            part = audit_records(
                ledger.records,
                budget_epsilon=budget,
                delta=delta,
                tolerance=tolerance,
                expect=expect,
            )
        except ValueError as err:
            raise ConfigError(f"cannot audit {str(ledger.path)!r}: {err}") from err
        clients += part.clients
        sources += [ledger.path] * len(part.clients)
    report = AuditReport(
        clients=tuple(clients), budget_epsilon=budget, tolerance=tolerance, delta=delta
    )
    return report, sources


def _shared_clients(report: AuditReport, sources: Sequence[Path]) -> list[str]:
    where: dict[tuple[str, str], list[Path]] = {}
    for c, source in zip(report.clients, sources, strict=True):
        where.setdefault((c.client, c.level), []).append(source)
    return [
        f"client {client!r} ({level}-level) appears in {len(paths)} ledgers "
        f"({', '.join(p.name for p in paths)}); each is audited on its own, but privacy "
        "loss on one data set adds up across them."
        for (client, level), paths in where.items()
        if len(paths) > 1
    ]


# -- output --------------------------------------------------------------------------
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


def _print_table(
    report: AuditReport,
    *,
    path: Path,
    files: Sequence[Path],
    budget: _Budget,
    facts: _RunFacts,
    plot: Path | None,
) -> None:
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


def _plot(ledgers: Sequence[_Ledger], report: AuditReport, path: Path) -> None:
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
