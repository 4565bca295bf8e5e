"""Scale: peak memory and round time of large simulated federations, measured in one run.

    python benchmarks/bench_scale.py [--clients 1000,100,200] [--fraction 0.05] [--rounds 2]

Every federation uses the default model (MiniLM-L6, LoRA r=8) on all WordNet
definitions of the 8 categories (``examples-per-label = 0``: 48,994 examples) and
samples ``--fraction`` of its clients per round for training and for evaluation. The
work per round is then the same whatever the number of clients ``K``: ``fraction x K``
clients with ``48,994 / K`` examples each. The reference is a federation of as many
clients as the largest one samples (``0.05 x 1000 = 50``) holding the same data per
client (``max-examples`` = 48,994 x 50 / 1000) with every client sampled: the same
work per round, and no client that is not sampled.

Each federation runs in a child process (``fedtune simulate``'s :func:`simulate`);
this process samples the memory of the child's whole process tree (the driver, the
ServerApp thread, Ray's own processes and its worker actors) every 0.25 s and prints:

* the peak of the tree's summed RSS (an upper bound: shared pages count in every
  process) and of its summed PSS (shared pages split between their processes);
* the memory per additional client: the slope of the peak RSS over ``K``;
* the last round's time (``round-seconds`` of ``metrics.jsonl``: train and evaluate)
  divided by the reference's last round (goal <= 1.25). The reference runs before and
  after the others and the ratio uses the mean of its two last rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Noun definitions of the 8 default categories in WordNet 3.0 (``examples-per-label = 0``).
ALL_EXAMPLES = 48_994
GIB = 1024**3


def _tree(root: int) -> set[int]:
    """``root`` and every process below it (from ``/proc``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, grew = {root}, True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        grew = bool(children)
        found |= children
    return found


def _memory(pid: int) -> tuple[int, int]:
    """``(RSS, PSS)`` of one process in bytes (0, 0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1]) * 1024
    return values.get("Rss:", 0), values.get("Pss:", 0)


def run_one(clients: int, fraction: float, max_examples: int, rounds: int) -> dict[str, float]:
    """One federation in a child process; its peak memory, wall time and last round time."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-scale-{clients}-"))
    run_dir = tmp / "run"
    flat = {
        "num-clients": clients,
        "num-rounds": rounds,
        "examples-per-label": 0,
        "max-examples": max_examples,
        "fraction-train": fraction,
        "fraction-evaluate": fraction,
    }
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(flat), str(run_dir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    peak_rss = peak_pss = 0
    start = time.perf_counter()
    while child.poll() is None:
        rss = pss = 0
        for pid in _tree(child.pid):
            r, p = _memory(pid)
            rss, pss = rss + r, pss + p
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.25)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"the {clients}-client federation failed (exit {child.returncode})")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(tmp, ignore_errors=True)
    last = records[-1]
    result = {
        "clients": clients,
        "sampled": last["clients-sampled"],
        "examples": max_examples or ALL_EXAMPLES,
        "peak-rss": peak_rss,
        "peak-pss": peak_pss,
        "wall": wall,
        "last-round": last["round-seconds"],
        "last-train": last["train-seconds"],
        "accuracy": last.get("eval-accuracy", float("nan")),
    }
    print(json.dumps(result), flush=True)  # each federation as it ends
    return result


def child(flat_json: str, run_dir: str) -> None:
    """The federation itself (in the child process)."""
    from fedtune.apps.simulation.driver import simulate

    simulate(json.loads(flat_json), run_dir=Path(run_dir))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--clients", default="1000,100,200", help="federation sizes K, run in this order"
    )
    parser.add_argument("--fraction", type=float, default=0.05, help="clients sampled a round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sizes = [int(k) for k in args.clients.split(",")]  # run in the order given
    # The reference: as many clients as the largest federation samples, each with the
    # data a client of it holds, all sampled.
    per_round = math.ceil(args.fraction * max(sizes))
    reference_examples = ALL_EXAMPLES * per_round // max(sizes)
    # The reference runs first and last, so that a machine whose load drifts during the
    # run shows up as two different reference times; the ratio uses their mean.
    first = run_one(per_round, 1.0, reference_examples, args.rounds)
    results = [first] + [run_one(k, args.fraction, 0, args.rounds) for k in sizes]
    last = run_one(per_round, 1.0, reference_examples, args.rounds)
    results.append(last)
    ref = {**first, "last-round": (first["last-round"] + last["last-round"]) / 2}
    print(
        f"\nreference last round: {first['last-round']:.1f} s before, "
        f"{last['last-round']:.1f} s after the others (mean {ref['last-round']:.1f} s)"
    )
    print(
        f"\n{'clients':>8} {'sampled':>8} {'examples':>9} {'peak RSS GiB':>13} "
        f"{'peak PSS GiB':>13} {'wall s':>8} {'last round s':>13} {'/ reference':>12} "
        f"{'accuracy':>9}"
    )
    for r in results:
        print(
            f"{r['clients']:>8} {r['sampled']:>8} {r['examples']:>9} "
            f"{r['peak-rss'] / GIB:>13.2f} {r['peak-pss'] / GIB:>13.2f} {r['wall']:>8.1f} "
            f"{r['last-round']:>13.1f} {r['last-round'] / ref['last-round']:>12.3f} "
            f"{r['accuracy']:>9.3f}"
        )
    big = sorted(results[1:-1], key=lambda r: r["clients"])
    if len(big) >= 2:
        lo, hi = big[0], big[-1]
        slope = (hi["peak-rss"] - lo["peak-rss"]) / (hi["clients"] - lo["clients"])
        print(
            f"\nmemory per additional client (peak RSS, {lo['clients']} -> {hi['clients']} "
            f"clients): {slope / 2**20:.2f} MiB"
        )
    print(
        f"largest federation: peak RSS {big[-1]['peak-rss'] / GIB:.2f} GiB (goal <= 6), "
        f"last round / reference {big[-1]['last-round'] / ref['last-round']:.3f} "
        "(goal <= 1.25)"
    )


if __name__ == "__main__":
    main()
