"""Claimed ε beside the empirical one-run lower bound, on the default model.

    python simulations/audit_sweep.py [--out runs/audit-sweep] [--canaries 1000]
                                      [--only eps8,eps8-plain,...]

Each setting is one `fedtune simulate` run in OUT/<setting>, then `fedtune audit
OUT/<setting> --json`: the quickstart without DP (claimed ε = ∞) and
`simulations/private.toml` (DP-SGD + CKKS) at ε in {8, 4, 1}, each with
`audit-canaries = M` and, for the run-time comparison, without (`-plain`). One JSON
line per finished run is appended to OUT/results.jsonl (so a cut-off sweep keeps what
it measured), and the Markdown table of the README is printed at the end. Runs one
after another; about 3-7 minutes each on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import ROOT, SETTINGS, simulate  # noqa: E402 - the same named federations as the ε sweep

BASE = {
    name: SETTINGS[key]
    for name, key in (("no-dp", "quickstart"), ("eps8", "eps8"), ("eps4", "eps4"), ("eps1", "eps1"))
}


def _settings(canaries: int) -> dict[str, tuple[str, list[str]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    for name, (config, sets) in BASE.items():
        out[name] = (config, [*sets, f"audit-canaries={canaries}"])
    for name, (config, sets) in BASE.items():
        out[f"{name}-plain"] = (config, sets)
    return out


def _run(name: str, config: str, sets: list[str], out: Path) -> dict[str, object]:
    run_dir = out / name
    records, wall = simulate(config, sets, run_dir)
    row: dict[str, object] = {
        "setting": name,
        "final-accuracy": records[-1]["eval-accuracy"],
        "wall-seconds": round(wall, 1),
    }
    audit = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "audit", str(run_dir), "--json", "--no-plot"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    row["audit-exit"] = audit.returncode
    if audit.stdout.strip().startswith("{"):
        report = json.loads(audit.stdout)
        row["empirical"] = report.get("empirical")
        row["claimed"] = max(
            (float(c["reported_epsilon"]) for c in report.get("clients", [])), default=None
        )
    return row


def _table(rows: list[dict[str, object]]) -> str:
    by = {str(r["setting"]): r for r in rows}
    lines = [
        "| run | claimed ε (max over clients) | empirical ε ≥ (worst client) | right / guesses "
        "| canaries per client | confidence | wall time with / without canaries |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in BASE:
        r = by.get(name)
        if r is None:
            continue
        e = r.get("empirical") or {}
        plain = by.get(f"{name}-plain")
        claimed = r.get("claimed")
        lines.append(
            f"| {name} | {'∞ (no DP)' if claimed is None else f'{claimed:.3f}'} "
            f"| {float(e.get('epsilon-lower-bound', float('nan'))):.3f} "
            f"| {e.get('correct')} / {e.get('guesses')} | {e.get('canaries')} "
            f"| {e.get('confidence')} | {r['wall-seconds']} s / "
            f"{plain['wall-seconds'] if plain else 'not run'} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/audit-sweep"))
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--only", default="", help="comma-separated settings (default: all)")
    args = parser.parse_args()
    settings = _settings(args.canaries)
    names = [n for n in args.only.split(",") if n] or list(settings)
    unknown = sorted(set(names) - set(settings))
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {sorted(settings)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = []
    for name in names:
        config, sets = settings[name]
        row = _run(name, config, sets, args.out)
        rows.append(row)
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(_table(rows))


if __name__ == "__main__":
    main()
