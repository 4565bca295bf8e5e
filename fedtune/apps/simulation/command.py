"""``fedtune simulate``: run a simulated federation and print one table row per round.

The command's arguments are parsed by :mod:`fedtune.cli.run_commands` (the library's
parser of every command); this is its handler, which starts the simulation driver
(:mod:`fedtune.apps.simulation.driver`, which imports both apps). The ``fedtune``
program (:mod:`fedtune.apps.cli`) registers it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from fedtune.apps.simulation.progress import RunProgress
from fedtune.cli.run_commands import OneLineParser, add_parsers, output_dir, readable_text
from fedtune.config import collect_overrides, parse_assignment, parse_run_config
from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.apps.simulation.driver import SimulationResult

__all__ = ["check_arguments", "early_check", "run_simulate"]


def run_simulate(args: argparse.Namespace) -> int:
    """Run the federation ``args`` describe and print one table row per round."""
    with RunProgress() as progress:  # a live line from the first second on a terminal
        progress.phase("loading fedtune (torch, transformers, Flower)")
        result = _simulate(args, progress)
    return _print_result(result)


def early_check(argv: Sequence[str]) -> int | None:
    """The mistakes of ``fedtune simulate ...`` (``argv``: after ``fedtune``) that need no torch.

    Run by the ``fedtune`` program (:func:`fedtune.apps.cli.main`) before it imports the
    commands (torch, transformers, Flower: seconds). ``simulate``'s own parser (the one
    :func:`fedtune.cli.run_commands.add_parsers` registers: its usage, help and argument
    errors are the full program's) reads ``argv``, then :func:`check_arguments` checks
    the files and the config keys and values. Returns the exit code of a mistake (its
    one line printed as :mod:`fedtune.cli.dispatch` prints it), ``None`` when the run
    may go on: every check is made again on the way, so this only answers sooner.
    """
    parser: argparse.ArgumentParser = OneLineParser(prog="fedtune")
    add_parsers(parser.add_subparsers(dest="command"))
    args, extra = parser.parse_known_args(list(argv))  # -h and bad options exit here
    try:
        if extra:
            _check_extra(args, extra)
            return None  # the full parser names what it does not know
        check_arguments(args)
    except ConfigError as err:
        print(f"fedtune simulate: error: {err}", file=sys.stderr)
        return 2
    return None


def _check_extra(args: argparse.Namespace, extra: Sequence[str]) -> None:
    """Name the usual cause of arguments ``simulate`` does not take."""
    if any(e == "--config" or e.startswith("--config=") for e in extra):
        raise ConfigError(
            "`fedtune simulate` takes the config file as its argument, without --config: "
            "`fedtune simulate FILE.toml [--set KEY=VALUE ...]`."
        )
    for item in args.overrides:
        if "=" not in item:  # --set num-rounds = 3: the shell split it in three
            parse_assignment(item)


def check_arguments(args: argparse.Namespace) -> dict[str, object]:
    """Check what ``simulate``'s arguments alone can show; return the flat config.

    The config file (readable UTF-8 TOML, flat keys), ``--run-dir`` (a directory this
    process can make), each ``--set``, and every key and value of a new run that needs
    neither the task and codec registries nor torch (:func:`fedtune.config.parse_run_config`,
    keys as set: :func:`fedtune.config.check_given`). With ``--resume``, the run's own
    ``config.toml`` is read later, by the driver.
    """
    if args.resume is not None:
        if args.config is not None or args.run_dir is not None:
            raise ConfigError(
                "--resume RUN_DIR takes the run's own config.toml and directory; drop "
                + ("the config file" if args.config is not None else "--run-dir")
                + " (only --set num-rounds=N may extend the run)."
            )
        return collect_overrides(None, args.overrides)
    if args.config is not None and args.config.is_dir():
        raise ConfigError(
            f"config {str(args.config)!r} is a directory; expected a TOML file of config keys."
        )
    if args.config is not None:
        readable_text(args.config, "config file")
    if args.run_dir is not None:
        output_dir(args.run_dir, "--run-dir")
    flat = collect_overrides(args.config, args.overrides)
    parse_run_config(flat, given=True)
    return flat


def _simulate(args: argparse.Namespace, progress: RunProgress) -> SimulationResult:
    flat = check_arguments(args)
    from fedtune.apps.simulation.driver import simulate  # torch, Flower, both apps

    if args.resume is not None:
        return simulate(
            flat, run_dir=args.resume, verbose=args.verbose, resume=True, progress=progress
        )
    return simulate(flat, run_dir=args.run_dir, verbose=args.verbose, progress=progress)


def _print_result(result: SimulationResult) -> int:
    records = result.records
    console = Console()
    table = Table(title=f"fedtune simulate: {result.run_dir}")
    has_eps = any("epsilon" in r for r in records)
    columns = ["round", "clients"]
    # DP clients send no training statistic: no train-loss column for a DP run
    columns += ["train-loss"] if any("train-loss" in r for r in records) else []
    columns += ["eval-loss", "eval-accuracy"]
    # The task's further held-out metrics (perplexity, reward margin), in record order.
    shown = {"eval-loss", "eval-accuracy", "eval-examples", "eval-seconds"}
    extra = [k for r in records for k in r if k.startswith("eval-") and k not in shown]
    columns += list(dict.fromkeys(extra))
    columns += ["epsilon"] if has_eps else []
    for col in [*columns, "seconds"]:
        table.add_column(col, justify="right")
    for r in records:
        row = [str(r["round"]), f"{r.get('clients-trained', '-')}"]
        row += [_fmt(r.get(k)) for k in columns[2:]]
        row.append(f"{r.get('round-seconds', r.get('eval-seconds', 0.0)):.1f}")
        table.add_row(*row)
    console.print(table)
    console.print(f"wall time {result.seconds:.1f} s; adapter: {result.adapter_dir}")
    return 0


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "-"
