"""Multiparty CKKS with training: round time against shared-key CKKS, accuracy against plain.

Run on demand (each run is a whole ``fedtune simulate``; minutes each on 2 cores)::

    python benchmarks/bench_multiparty_train.py                 # the quickstart, 2 pairs
    python benchmarks/bench_multiparty_train.py --reps 3 --out runs/bench-mp-train
    python benchmarks/bench_multiparty_train.py --engine ray    # Flower's engine (Ray)
    python benchmarks/bench_multiparty_train.py --reps 1 --set num-rounds=1   # shorter

``--engine in-process`` (the default) runs each federation with
``scripts/simulate_in_process.py``: the driver, the ServerApp and every ClientApp in one
process, one message at a time (no Ray, whose start-up fails on a loaded 2-core machine).
The clients then train and encrypt one after another, so a round's time is the sum of all
parties' work, for both backends alike; ``--engine ray`` runs ``fedtune simulate``.

Each repetition runs the same federation (``--config``, default
``simulations/quickstart.toml``) twice, with ``encryption-backend = "ckks"`` and with
``"ckks-multiparty"``, in alternating order (``--first`` first in even repetitions, the
other in odd ones), so that a change in the machine's load hits both; then one run
without encryption (unless ``--no-plain``). Printed per run: the mean ``train-seconds`` of
its rounds (the round's exchange, training and, for multiparty, the quorum's decryption
step), the process's wall time and the final ``eval-accuracy``; then the ratio
multiparty / shared-key of the mean round time, per pair and over all pairs, and
``accuracy - plain`` of each encrypted run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedtune.config import load_toml

ROOT = Path(__file__).resolve().parents[1]


def run(
    config: Path, run_dir: Path, backend: str | None, engine: str, extra: dict[str, str]
) -> dict[str, float]:
    """One simulated run; its mean round time, wall time and final accuracy."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    sets = {} if backend is None else {"encryption": "true", "encryption-backend": backend}
    sets = {**extra, **sets}
    if engine == "ray":
        argv = [sys.executable, "-m", "fedtune.cli", "simulate", str(config)]
        argv += ["--run-dir", str(run_dir)]
        argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    else:
        flat = {
            **{
                k: str(v).lower() if isinstance(v, bool) else v
                for k, v in load_toml(config).items()
            },
            **sets,
        }
        argv = [sys.executable, str(ROOT / "scripts" / "simulate_in_process.py"), str(run_dir)]
        argv += [f"{k}={v}" for k, v in flat.items()]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["train-seconds"] for r in rows if r["round"] > 0]
    return {
        "round": statistics.mean(train),
        "wall": wall,
        "accuracy": float(rows[-1]["eval-accuracy"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "simulations" / "quickstart.toml")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-multiparty-train")
    ap.add_argument("--engine", choices=("in-process", "ray"), default="in-process")
    ap.add_argument("--first", choices=("ckks", "ckks-multiparty"), default="ckks")
    ap.add_argument("--no-plain", action="store_true", help="skip the run without encryption")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    args = ap.parse_args()
    if args.reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {args.reps}.")
    if any("=" not in kv for kv in args.set):
        raise SystemExit(f"--set takes KEY=VALUE, got {args.set}.")
    extra = dict(kv.split("=", 1) for kv in args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    ratios, results = [], {"ckks": [], "ckks-multiparty": []}
    for rep in range(args.reps):
        order = ["ckks", "ckks-multiparty"]
        if (rep % 2 == 1) != (args.first == "ckks-multiparty"):
            order.reverse()
        pair = {}
        for backend in order:
            pair[backend] = run(
                args.config, args.out / f"{backend}-{rep}", backend, args.engine, extra
            )
            results[backend].append(pair[backend])
            r = pair[backend]
            print(
                f"rep {rep} {backend:16s} mean round {r['round']:7.2f} s  wall {r['wall']:7.1f} s"
                f"  final eval-accuracy {r['accuracy']:.4f}",
                flush=True,
            )
        ratios.append(pair["ckks-multiparty"]["round"] / pair["ckks"]["round"])
        print(f"rep {rep} round time multiparty / shared-key: {ratios[-1]:.3f}", flush=True)
    mean = {b: statistics.mean(r["round"] for r in v) for b, v in results.items()}
    print(
        f"round time multiparty / shared-key: per pair {', '.join(f'{x:.3f}' for x in ratios)}; "
        f"of the means {mean['ckks-multiparty'] / mean['ckks']:.3f} "
        f"({mean['ckks-multiparty']:.2f} s / {mean['ckks']:.2f} s)"
    )
    if args.no_plain:
        return
    plain = run(args.config, args.out / "plain", None, args.engine, extra)
    print(
        f"plain (no encryption)   mean round {plain['round']:7.2f} s  wall {plain['wall']:7.1f} s"
        f"  final eval-accuracy {plain['accuracy']:.4f}"
    )
    for backend, v in results.items():
        acc = [r["accuracy"] for r in v]
        diffs = ", ".join(f"{a - plain['accuracy']:+.4f}" for a in acc)
        print(f"final eval-accuracy {backend} - plain: {diffs}")


if __name__ == "__main__":
    main()
