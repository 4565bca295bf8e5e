"""Write docs/configuration.md from the config dataclasses' field metadata.

Usage: ``python scripts/gen_config_docs.py`` (rewrite the file) or ``--check`` (exit 1 when
the committed file is out of date, or a key has no help). ``tests/test_docs.py`` runs the
same check. The text comes from :func:`fedtune.config.reference.markdown`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.config.reference import markdown, missing_help

OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def main() -> int:
    """Write (or with ``--check`` compare) ``docs/configuration.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    missing = missing_help()
    if missing:
        print(f"keys without help metadata: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = markdown()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
