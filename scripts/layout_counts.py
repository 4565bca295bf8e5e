"""Print the layout counts that ``tests/test_layout.py`` asserts.

Usage: ``python scripts/layout_counts.py`` from the repository root. Prints the number of
import cycles among fedtune's modules (counting imports inside functions), the imports
inside functions outside the named allow-list of heavy optional dependencies, the imports
of an app by the library, and each offender.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test imports fedtune.errors from this checkout


def main() -> int:
    spec = importlib.util.spec_from_file_location("test_layout", ROOT / "tests" / "test_layout.py")
    assert spec is not None and spec.loader is not None
    layout = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = layout  # dataclasses look their module up there
    spec.loader.exec_module(layout)
    counts = layout.layout_counts()
    print(counts.summary())
    for line in counts.details():
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
