"""The ``fedtune`` command: the parser and dispatch, and one module per command group.

Modules
-------
dispatch          the parser of every subcommand, dispatch, and the error-to-exit-code rule
run_commands      simulate, evaluate, keygen, export (their parsers)
use_commands      evaluate (also --data FILE), export (also --base-model), predict
audit             ``fedtune audit``: its options, the steps of a run, the exit code
audit_inputs      the ledgers, budget, δ and run config an audit reads
audit_empirical   the canaries' empirical lower bounds on ε
audit_view        the terminal table (100 columns; ``--wide``), the JSON report
audit_plot        the ε plot (identical clients drawn once, named)
audit_provenance  the HTML page's provenance: run, version, dates, sources, accountant
audit_report      the self-contained HTML page of ``--report``

``deploy`` and ``generate`` register themselves from :mod:`fedtune.deploy.cli` and
:mod:`fedtune.cli.generate`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

#: The exit code of a command whose reader went away (128 + SIGPIPE, as a shell shows it).
EXIT_PIPE_CLOSED = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedtune`` console script (and ``python -m fedtune.cli``).

    :func:`fedtune.cli.dispatch.main`, ending quietly when the reader of its output
    goes away (``fedtune audit --json | head -1``): no ``BrokenPipeError`` trace, here
    or when the interpreter flushes stdout on its way out.
    """
    _early_status(sys.argv[1:] if argv is None else list(argv))
    try:
        try:
            from fedtune.cli import dispatch  # noqa: PLC0415 - after the early status line

            code = dispatch.main(argv)
        finally:  # also after --help (SystemExit): the flush is where a closed pipe shows
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE_CLOSED
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``fedtune`` and its subcommands (:mod:`fedtune.cli.dispatch`)."""
    from fedtune.cli.dispatch import build_parser as build  # noqa: PLC0415

    return build()


def _early_status(argv: Sequence[str]) -> None:
    """On a terminal, say what ``fedtune simulate`` does while its libraries load.

    The commands' modules import ``datasets`` and ``transformers`` before any command
    runs (seconds on a busy machine); the simulation's live display
    (:mod:`fedtune.apps.simulation.progress`) replaces this line when it starts.
    """
    if argv[:1] != ["simulate"] or "-h" in argv or "--help" in argv:
        return
    if sys.stderr.isatty():
        sys.stderr.write("fedtune simulate: loading torch, transformers and Flower…")
        sys.stderr.flush()


def _silence_stdout() -> None:
    """Point stdout at ``/dev/null``: the interpreter's last flush then has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
