"""scripts/try_mistakes.py --fast: a user's commonest mistakes each end in one clean line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_fast_mistakes_are_all_clean() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "try_mistakes.py"), "--fast"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 traceback, 0 noisy, 0 silent" in summary, proc.stdout
    graded = [line for line in proc.stdout.splitlines() if line.startswith("clean")]
    assert len(graded) >= 6, proc.stdout
