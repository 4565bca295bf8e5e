"""The ``fedtune`` program: the library's commands (:mod:`fedtune.cli`) and ``simulate``.

``fedtune simulate`` starts the simulation driver, which imports both Flower apps; the
library (everything in :mod:`fedtune` outside :mod:`fedtune.apps`) imports no app, so the
program that offers every command lives here, at the top. The console script
(``[project.scripts]``) and ``python -m fedtune.cli`` both run :func:`main`.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.apps.simulation import command
from fedtune.cli import dispatch

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedtune`` console script (exit codes: :mod:`fedtune.cli.dispatch`)."""
    return dispatch.main(argv, extra={"simulate": command.run_simulate})
