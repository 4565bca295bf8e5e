"""Run a federation in several privacy / encryption settings and tabulate.

    python simulations/sweep.py [--suite quickstart|silos] [--out DIR] [--only a,b,...]

Each setting is one `fedtune simulate` run in OUT/<setting>, each DP run checked
with `fedtune audit` (exit 0: no client over its budget and every ε agrees with
the PRV recomputation).

* ``--suite quickstart`` (OUT default runs/sweep): the quickstart (the same model,
  data, clients and rounds without DP: ε = ∞) with and without encryption, and
  `simulations/private.toml` (DP-SGD + encryption) at ε in {8, 4, 1}, and at ε = 8 with
  float noise (`eps8-float`).
  `private-no-dp` is private.toml with `dp = "off"`: its SGD learning rate is tuned
  for clipped, noisy gradients and is too large without them, so it is not the
  ε = ∞ baseline (run it with --only to see).
* ``--suite silos`` (OUT default runs/silos): `simulations/silos.toml` (all 48,994
  definitions, 4 IID silos, no DP) and `simulations/silos-private.toml` (DP-SGD +
  CKKS) at ε in {8, 4, 2, 1}. About 20-30 minutes a run on a 2-core CPU.
  Two diagnostics of the ε = 8 gap run only when named, e.g.
  ``--suite silos --out runs/diag --only silos-clip-only,silos-eps8-5rounds``: the
  recipe's clipping with almost no noise (σ = 0.02, not DP), and ε = 8 over 5 rounds.

The Markdown table printed at the end is the one in docs/results.md: training's σ, the
weighted held-out accuracy the run reported for round 0 and its last round (with DP
held-out evaluation a noisy release), the final adapter's exact accuracy (``fedtune
evaluate``, which re-scores it on every client's held-out split), its gap to the suite's
non-private run, the largest ε any client spent, dp-accounting's PLD ε of the same
releases taken as continuous Gaussians (a reference: the claimed ε is the run's own
accountant's), the audit's verdict, and wall time. OUT/sweep.json is rewritten after
every run, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("simulations/quickstart.toml", []),
    "quickstart-encrypted": ("simulations/quickstart.toml", ["encryption=true"]),
    "eps8": ("simulations/private.toml", ["target-epsilon=8"]),
    "private-no-dp": ("simulations/private.toml", ["dp=off"]),
    # Float noise, ε from PRV (no proven bound for the float mechanism: docs/float-noise.md):
    # what the grid default's proven accounting costs at this size.
    "eps8-float": ("simulations/private.toml", ["target-epsilon=8", "dp-noise=float"]),
    # Held-out replies are DP releases (σ_eval, README "Held-out evaluation under the
    # guarantee"); below ε = 8 a larger σ_eval keeps them to a small share of the budget.
    "eps4": ("simulations/private.toml", ["target-epsilon=4", "eval-noise-multiplier=20"]),
    "eps1": ("simulations/private.toml", ["target-epsilon=1", "eval-noise-multiplier=80"]),
    "silos": ("simulations/silos.toml", []),
    "silos-eps8": ("simulations/silos-private.toml", ["target-epsilon=8"]),
    "silos-eps4": (
        "simulations/silos-private.toml",
        ["target-epsilon=4", "eval-noise-multiplier=20"],
    ),
    "silos-eps2": (
        "simulations/silos-private.toml",
        ["target-epsilon=2", "eval-noise-multiplier=40"],
    ),
    "silos-eps1": (
        "simulations/silos-private.toml",
        ["target-epsilon=1", "eval-noise-multiplier=80"],
    ),
    # Diagnostics of the ε = 8 gap (run with --only; not in the suite's default):
    "silos-clip-only": (
        "simulations/silos-private.toml",
        [
            "noise-multiplier=0.02",
            "accountant=rdp",
            "target-epsilon=10000000",
            "epsilon-budget=10000000",
        ],
    ),
    "silos-eps8-5rounds": ("simulations/silos-private.toml", ["target-epsilon=8", "num-rounds=5"]),
}
#: Settings that are not DP at all: the recipe's clipping with σ = 0.02 (ε in the hundreds
#: of thousands), to measure what the noise costs. Neither PLD nor the audit is run on them
#: (the audit rightly reports every client over any budget: PRV gives ε = inf).
NOT_DP = {"silos-clip-only"}
#: ``--suite`` -> (default settings, the non-private setting the gap is measured to, OUT).
SUITES: dict[str, tuple[str, str, str]] = {
    "quickstart": (
        "quickstart,quickstart-encrypted,eps8,eps4,eps1,eps8-float",
        "quickstart",
        "runs/sweep",
    ),
    "silos": ("silos-eps8,silos,silos-eps1,silos-eps4,silos-eps2", "silos", "runs/silos"),
}


def simulate(config: str, sets: list[str], run_dir: Path) -> tuple[list[dict[str, object]], float]:
    """``fedtune simulate CONFIG --set ...`` into ``run_dir``: its metrics records, wall seconds."""
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", config, "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], wall


def _pld_epsilon(ledger: Path) -> float | None:
    """The ledger's ε recomputed by Google's dp-accounting (PLD, replace-one): independent
    of Opacus' PRV accountant that the ledger and the audit use. None without the package
    (a dev extra: ``pip install -e '.[dev]'``)."""
    try:
        import dp_accounting as dpa
        from dp_accounting.pld import PLDAccountant
    except ImportError:
        return None

    records = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    accountant = PLDAccountant(
        neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=1e-3,
    )
    for r in records:
        event = dpa.GaussianDpEvent(r["noise_multiplier"])
        accountant.compose(dpa.PoissonSampledDpEvent(r["sample_rate"], event), r["steps"])
    return float(accountant.get_epsilon(records[-1]["delta"]))


def _exact_accuracy(run_dir: Path) -> float:
    """The final adapter re-scored on every client's held-out split (``fedtune evaluate``).

    With DP held-out evaluation the run's own ``eval-accuracy`` is a noisy release (its
    noise is what keeps it within the budget); this is the exact number, computed here
    from data the sweep holds.
    """
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "evaluate", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"^weighted accuracy ([0-9.]+)", done.stdout, re.M)
    if found is None:
        raise RuntimeError(f"fedtune evaluate {run_dir} printed no accuracy: {done.stdout!r}")
    return float(found.group(1))


def _run(
    name: str, out: Path, *, reuse: bool = False, measured: float | None = None
) -> dict[str, object]:
    config, sets = SETTINGS[name]
    run_dir = out / name
    metrics = run_dir / "metrics.jsonl"
    if reuse and (run_dir / "adapter").is_dir():  # a finished run: read it, do not rerun
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        # The sweep's own wall time when it has one, else the sum of the rounds' times.
        wall = (
            measured
            if measured is not None
            else sum(float(r.get("round-seconds", r.get("eval-seconds", 0.0))) for r in records)
        )
    else:
        records, wall = simulate(config, sets, run_dir)
    row: dict[str, object] = {
        "setting": name,
        "round-0": records[0]["eval-accuracy"],
        "final": records[-1]["eval-accuracy"],
        "epsilon": records[-1].get("epsilon"),
        "wall-seconds": wall,
    }
    row["exact"] = _exact_accuracy(run_dir)
    ledgers = sorted((run_dir / "privacy").glob("*.jsonl"))
    if ledgers:  # training's σ: a ledger also holds the held-out evaluations' releases
        records = [json.loads(line) for line in ledgers[0].read_text().splitlines() if line]
        train = [r for r in records if r.get("kind", "train") == "train"]
        row["sigma"] = train[0].get("noise_multiplier") if train else None
    if ledgers and name not in NOT_DP:  # the last record of each ledger: after the final
        # evaluation's release too, which the metrics' last line (its training) does not count
        row["epsilon"] = max(
            json.loads(path.read_text().splitlines()[-1])["epsilon"] for path in ledgers
        )
    if name in NOT_DP:
        row["audit"] = "not DP"
    elif ledgers:  # a DP run (a run without DP may keep a step guard in privacy/)
        pld = [_pld_epsilon(path) for path in ledgers]
        row["pld-epsilon"] = None if None in pld else max(pld)  # type: ignore[type-var]
        audit = subprocess.run(
            [sys.executable, "-m", "fedtune.cli", "audit", str(run_dir), "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        row["audit"] = "ok" if audit.returncode == 0 else f"FAILED ({audit.returncode})"
    return row


def plot_curves(out: Path, names: list[str], path: Path) -> None:
    """Held-out accuracy per round of every finished setting in ``names``, one axis."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    for i, name in enumerate(names):
        metrics = out / name / "metrics.jsonl"
        if not metrics.is_file():
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        rounds = [r["round"] for r in records if "eval-accuracy" in r]
        accuracy = [r["eval-accuracy"] for r in records if "eval-accuracy" in r]
        private = any((out / name / "privacy").glob("*.jsonl"))  # ledgers: a DP run
        style = "o-" if private else "s--"
        # each later curve's markers smaller, so equal curves still show each other
        ax.plot(rounds, accuracy, style, markersize=max(3.0, 9.0 - 1.5 * i), label=name)
    ax.set(
        title="held-out accuracy per round, as reported\n(DP runs: a noisy release)",
        xlabel="round",
        ylabel="weighted accuracy",
    )
    ax.set(ylim=(0.0, 1.0))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="quickstart")
    parser.add_argument("--out", type=Path, default=None, help="default: the suite's")
    parser.add_argument("--only", default="", help="comma-separated settings")
    parser.add_argument("--plot", type=Path, help="also write the accuracy per round to this PNG")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read settings whose OUT/<setting> already finished instead of running them again "
        "(wall time from OUT/sweep.json, else the sum of the rounds' times)",
    )
    args = parser.parse_args()
    default, baseline, out = SUITES[args.suite]
    args.out = args.out or Path(out)
    names = [n for n in (args.only or default).split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    earlier = args.out / "sweep.json"  # wall times a previous sweep measured (for --reuse)
    walls = {
        r["setting"]: float(r["wall-seconds"])
        for r in (json.loads(earlier.read_text()) if earlier.is_file() else [])
    }
    rows = []
    for name in names:
        rows.append(_run(name, args.out, reuse=args.reuse, measured=walls.get(name)))
        (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot_curves(args.out, names, args.plot)
    base = next((float(r["exact"]) for r in rows if r["setting"] == baseline), None)  # type: ignore[arg-type]
    print(
        "| setting | σ (training) | reported accuracy round 0 / final | final accuracy, exact "
        f"| vs. {baseline} | max ε spent | ε by dp-accounting (PLD) | audit | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        sigma = "-" if r.get("sigma") is None else f"{r['sigma']:.3f}"
        pld = "-" if r.get("pld-epsilon") is None else f"{r['pld-epsilon']:.2f}"
        exact = float(r["exact"])  # type: ignore[arg-type]
        gap = "-" if base is None else f"{exact - base:+.3f}"
        print(
            f"| {r['setting']} | {sigma} | {r['round-0']:.3f} / {r['final']:.3f} | {exact:.3f} "
            f"| {gap} | {eps} | {pld} | {r.get('audit', '-')} "
            f"| {float(r['wall-seconds']) / 60:.1f} min |"  # type: ignore[arg-type]
        )


if __name__ == "__main__":
    main()
