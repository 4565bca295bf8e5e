"""``python -m fedtune.cli``: the same as the ``fedtune`` console script.

A script, never imported: it runs the whole program (:func:`fedtune.apps.cli.main`),
which adds ``simulate`` to the library's commands.
"""

from __future__ import annotations

from fedtune.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
