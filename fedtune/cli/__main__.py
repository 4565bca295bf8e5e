"""``python -m fedtune.cli``: the same as the ``fedtune`` console script."""

from __future__ import annotations

from fedtune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
