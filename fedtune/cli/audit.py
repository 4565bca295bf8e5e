"""``fedtune audit PATH``: recompute every client's ε from its privacy ledger and judge it.

The wiring around :func:`fedtune.privacy.audit.audit_records` (the maths lives there):
find and read the ledgers under ``PATH`` (:mod:`fedtune.cli.audit_inputs`), find the
budget, add the canaries' lower bounds (:mod:`fedtune.cli.audit_empirical`), print a
table or JSON and a plot (:mod:`fedtune.cli.audit_view`), and turn the verdicts into an
exit code.

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
import math
import sys
from pathlib import Path

from fedtune.cli import audit_view as view
from fedtune.cli.audit_empirical import canary_dir, empirical_bounds, refutations
from fedtune.cli.audit_inputs import (
    audit_ledgers,
    find_budget,
    find_ledgers,
    read_ledgers,
    run_facts,
    shared_clients,
)
from fedtune.cli.audit_provenance import run_settings_of
from fedtune.errors import ConfigError
from fedtune.privacy.audit import audit_records

__all__ = ["add_parser", "run"]

DEFAULT_TOLERANCE: float = inspect.signature(audit_records).parameters["tolerance"].default
"""The audit's own default (``2 * PRV_EPS_ERROR``); read from it so the two never drift."""

DESCRIPTION = """\
Recompute every client's ε from its privacy ledger, compare with the ε the client
reported, and check it against the ε budget. The ε that decides is the one of the
accountant proven for the noise that ran: discrete-rdp (Canonne, Kamath & Steinke 2020)
for a history holding a discrete Gaussian on a grid (grid DP-SGD, the default, and every
client-level share), PRV (Gopi et al. 2021) for float Gaussian noise only. The table
names it; the continuous-Gaussian PRV and RDP (Mironov et al. 2019) ε are shown beside
it for comparison (--wide, --json).

PATH is one of:
  a run directory        ledgers in PATH/privacy/*.jsonl (written by `fedtune simulate`)
  a node's state dir     ledgers in PATH/privacy/*.jsonl or PATH/*.jsonl
  a ledger file          PATH itself (*.jsonl)

ε is recomputed at the node's δ (--delta, else PATH/policy.toml, else the run's
target-delta in PATH/config.toml if at most 1e-5, else 1e-5), never at the δ a record
states, under the replace-one relation (every fedtune reply publishes the client's
example count, so a ledger that declares add-remove is inconsistent).

Verdicts: "overrun" (deciding ε or reported ε above the budget), "under-reported"
(some record's ε below the deciding ε recomputed for it by more than --tolerance),
"inconsistent" (a record at another δ, one that declares add-remove, an audit δ not
below 1 / n_k, or a composition that does not follow from the recorded batch size, epochs
and example count or from the run config), "ok".

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
            "the ε no client may exceed (default: `epsilon-budget` from PATH/policy.toml, "
            "else from PATH/config.toml, or `target-epsilon` when that is 0 or absent; with "
            "neither, the budget is not checked and the report says so)"
        ),
    )
    parser.add_argument(
        "--delta",
        type=_delta_arg,
        metavar="DELTA",
        help=(
            "the δ to audit at (default: the node's `delta` from PATH/policy.toml, else "
            "`target-delta` from PATH/config.toml when at most 1e-5, else 1e-5); records "
            "written at another δ are flagged inconsistent"
        ),
    )
    parser.add_argument(
        "--tolerance",
        type=_tolerance_arg,
        default=DEFAULT_TOLERANCE,
        metavar="EPS",
        help=(
            f"how far a reported ε may sit below the recomputed deciding ε (default "
            f"{DEFAULT_TOLERANCE:g}: the PRV accountant is exact to ±0.01, so two honest "
            "computations of one history can differ by up to 0.02; more is not numerics)"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print a machine-readable report to stdout"
    )
    parser.add_argument(
        "--wide",
        action="store_true",
        help=(
            "a wider table: the relation, noise source, q, δ and the continuous-Gaussian "
            "RDP and PRV ε of every row "
            "(the default table fits 100 columns and states what the rows share below it)"
        ),
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
    canaries = canary_dir(path)
    try:
        files, ledger_dir = find_ledgers(path)
    except ConfigError:
        if canaries is None:
            raise
        return _canaries_only(args, path, canaries)
    ledgers, notes = read_ledgers(files)
    budget = find_budget(args.budget, path)
    facts = run_facts(args.delta, path)
    report, sources = audit_ledgers(
        ledgers,
        budget=budget.epsilon,
        delta=facts.delta,
        tolerance=args.tolerance,
        expect=facts.expect,
    )
    notes += shared_clients(report, sources)
    empirical = empirical_bounds(canaries, report, delta=facts.delta)

    plot: Path | None = None
    if not args.no_plot:
        plot = args.plot or (ledger_dir / "epsilon.png" if ledger_dir is not None else None)
    if plot is not None:
        view.plot_epsilon(ledgers, report, plot, settings=run_settings_of(path) or "")

    for note in notes:
        print(f"fedtune audit: warning: {note}", file=sys.stderr)
    if args.json:
        view.print_json(
            report,
            sources=sources,
            empirical=empirical,
            path=path,
            files=files,
            budget=budget,
            facts=facts,
            plot=plot,
            notes=notes,
        )
    else:
        view.print_table(
            report,
            path=path,
            files=files,
            budget=budget,
            facts=facts,
            plot=plot,
            wide=args.wide,
        )
        if empirical:
            view.print_empirical(empirical)
    refuted = refutations(empirical)
    if args.report is not None:
        view.report_page(
            args.report,
            path,
            report=report,
            empirical=empirical,
            ledgers=ledgers,
            notes=notes,
            refuted=refuted,
            budget=budget,
            facts=facts,
        )
    for c in report.clients:
        kind = "warning" if c.verdict == "ok" else c.verdict  # ok may still note duplicates
        for problem in c.problems:
            print(
                f"fedtune audit: client {c.client!r} ({c.level}-level) {kind}: {problem}",
                file=sys.stderr,
            )
    return 0 if report.ok and not refuted else 1


def _canaries_only(args: argparse.Namespace, path: Path, folder: Path) -> int:
    """A canary run without DP: no ledgers, only the empirical bound (claimed ε = ∞)."""
    facts = run_facts(args.delta, path)
    empirical = empirical_bounds(folder, None, delta=facts.delta)
    if args.json:
        view.print_canaries_json(path, empirical)
    else:
        print(f"fedtune audit: {path}: no privacy ledgers (dp = off); canaries only")
        view.print_empirical(empirical)
    if args.report is not None:
        view.report_page(
            args.report, path, report=None, empirical=empirical, ledgers=(), notes=(), refuted=[]
        )
    return 0
