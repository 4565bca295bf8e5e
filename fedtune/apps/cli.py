"""The ``fedtune`` program: the library's commands (:mod:`fedtune.cli`) and ``simulate``.

``fedtune simulate`` starts the simulation driver, which imports both Flower apps; the
library (everything in :mod:`fedtune` outside :mod:`fedtune.apps`) imports no app, so the
program that offers every command lives here, at the top. The console script
(``[project.scripts]``) and ``python -m fedtune.cli`` both run :func:`main`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["EXIT_PIPE_CLOSED", "main"]

#: The exit code of a command whose reader went away (128 + SIGPIPE, as a shell shows it).
EXIT_PIPE_CLOSED = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedtune`` console script (exit codes: :mod:`fedtune.cli.dispatch`).

    Ends quietly when the reader of its output goes away (``fedtune audit --json | head
    -1``): no ``BrokenPipeError`` trace, here or when the interpreter flushes stdout on
    its way out.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            # `simulate`'s mistakes that need no torch end here, in well under a second.
            from fedtune.apps.simulation import command

            if args[:1] == ["simulate"] and (early := command.early_check(args)) is not None:
                return early
            _early_status(args)
            # The commands' modules import datasets and transformers (seconds): after the
            # early status line.
            from fedtune.cli import dispatch

            code = dispatch.main(argv, extra={"simulate": command.run_simulate})
        finally:  # also after --help (SystemExit): the flush is where a closed pipe shows
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE_CLOSED
    return code


def _early_status(argv: Sequence[str]) -> None:
    """On a terminal, say what ``fedtune simulate`` does while its libraries load.

    The simulation's live display (:mod:`fedtune.apps.simulation.progress`) replaces
    this line when it starts.
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
