"""The ``fedtune`` command: the parser and dispatch, and one module per command group.

Modules
-------
dispatch          the parser of every subcommand, dispatch, and the error-to-exit-code rule
run_commands      simulate, evaluate, keygen, export
audit             ``fedtune audit``: its options, the steps of a run, the exit code
audit_inputs      the ledgers, budget, δ and run config an audit reads
audit_empirical   the canaries' empirical lower bounds on ε
audit_view        the terminal table, the JSON report, the ε plot
audit_report      the self-contained HTML page of ``--report``

``deploy`` and ``generate`` register themselves from :mod:`fedtune.deploy.cli` and
:mod:`fedtune.cli.generate`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from fedtune.cli import dispatch
from fedtune.cli.dispatch import build_parser

__all__ = ["build_parser", "main"]

#: The exit code of a command whose reader went away (128 + SIGPIPE, as a shell shows it).
EXIT_PIPE_CLOSED = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedtune`` console script (and ``python -m fedtune.cli``).

    :func:`fedtune.cli.dispatch.main`, ending quietly when the reader of its output
    goes away (``fedtune audit --json | head -1``): no ``BrokenPipeError`` trace, here
    or when the interpreter flushes stdout on its way out.
    """
    try:
        try:
            code = dispatch.main(argv)
        finally:  # also after --help (SystemExit): the flush is where a closed pipe shows
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE_CLOSED
    return code


def _silence_stdout() -> None:
    """Point stdout at ``/dev/null``: the interpreter's last flush then has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
