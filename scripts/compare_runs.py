"""Compare two run directories: metrics.jsonl field by field (timings aside), adapter bytes.

    python scripts/compare_runs.py RUN_A RUN_B

Prints every field of ``metrics.jsonl`` that differs (nested per-client tables
included), ignoring timing fields (keys ending in ``-seconds``), and the SHA-256 of
every file under each run's ``adapter/``. Exits 0 when both agree, 1 otherwise.
Used to show that a refactoring left a seeded run's results unchanged (issue 30).

Two runs match byte for byte only when nothing random differs: run both with the same
``PYTHONHASHSEED`` (PEFT writes ``target_modules`` from a set, so its order in
``adapter_config.json`` follows the string hash seed), and with DP on with
``seeded-noise = true`` and the same run nonce per client (a nonce is random per run by
design, :func:`fedtune.privacy.releases.run_nonce`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

TIMING_SUFFIX = "-seconds"


def without_timings(value: Any) -> Any:
    """``value`` with every ``*-seconds`` key removed, at any depth."""
    if isinstance(value, dict):
        return {
            k: without_timings(v) for k, v in value.items() if not str(k).endswith(TIMING_SUFFIX)
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Each place where ``a`` and ``b`` differ, as ``path: a != b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{where}: only in {'B' if key not in a else 'A'}")
            else:
                out += differences(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def records(run_dir: Path) -> list[Any]:
    """The run's metrics.jsonl, timing fields removed."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [without_timings(json.loads(line)) for line in lines if line.strip()]


def adapter_digests(run_dir: Path) -> dict[str, str]:
    """SHA-256 of each file under ``run_dir/adapter`` (relative path -> hex digest)."""
    root = run_dir / "adapter"
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    """Compare the two runs; print the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    a, b = records(args.run_a), records(args.run_b)
    diffs = differences(a, b) if len(a) == len(b) else [f"{len(a)} records != {len(b)}"]
    print(f"metrics.jsonl: {len(a)} records; {len(diffs)} difference(s) outside timings")
    for line in diffs:
        print("  " + line)
    da, db = adapter_digests(args.run_a), adapter_digests(args.run_b)
    for name in sorted(set(da) | set(db)):
        same = "same" if da.get(name) == db.get(name) else "DIFFERENT"
        print(f"adapter/{name}: {da.get(name, '-')[:16]} {db.get(name, '-')[:16]} {same}")
    equal = not diffs and da == db and bool(da)
    print("EQUAL" if equal else "NOT EQUAL")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
