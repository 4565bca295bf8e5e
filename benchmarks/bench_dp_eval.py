"""What a DP held-out evaluation costs: error bars on the reported metrics, and ε.

    python benchmarks/bench_dp_eval.py [--sigmas 5,10,20] [--draws 2000] [--no-model]

For each federation (``simulations/quickstart.toml``, ``private.toml``,
``silos-private.toml``; the silos once more at ε = 1) it prints, per client size:
the held-out count ``n_test``,
and for each candidate ``σ_eval`` the std of the reported accuracy and loss
(``width · σ · sqrt(2) / n_test``, :func:`fedtune.privacy.evaluation.metric_std`),
ε of the ``num-rounds + 1`` evaluations alone, and for the DP federations ε of the
training alone at its calibrated σ, ε of training plus evaluations at that σ, and
the training σ the plan calibrates when it leaves room for the evaluations
(:func:`fedtune.train.plan.privacy_plan`). All at δ = 1e-5, PRV, replace-one.

Then two draws of the mechanism on real numbers: the quickstart's client 0 held-out
split evaluated with the real MiniLM-L6 and the seeded, untrained initial adapter
(exact accuracy and loss, then ``--draws`` DP releases: their mean, std and three
reported values), and the silo size with docs/results.md's exact final accuracy of
silos-eps8 (0.898 on 2,450 held-out definitions; the per-example values are 0/1 with
that mean; the loss is not drawn).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (label, file in simulations/, overrides): the silo federation at its ε = 8 default and
#: at the README sweep's smallest target, ε = 1.
FEDERATIONS: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("quickstart", "quickstart", {}),
    ("private", "private", {}),
    ("silos-private", "silos-private", {}),
    ("silos-private ε=1", "silos-private", {"target-epsilon": 1.0}),
)
SILO_EXACT_ACCURACY = 0.898  # docs/results.md, silo table: silos-eps8's final held-out accuracy


def _config(name: str, **overrides: object):  # type: ignore[no-untyped-def]
    from fedtune.config import parse_run_config
    from fedtune.config.parse import load_toml

    return parse_run_config({**load_toml(ROOT / "simulations" / f"{name}.toml"), **overrides})


def _sizes(cfg) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(n_train, n_test) of every client, by the split every task uses."""
    from fedtune import data as fdata

    fed = cfg.federation
    data = fdata.load_data(cfg.data, seed=fed.seed)
    out = []
    for k in range(fed.num_clients):
        split = fdata.client_data(
            data, cfg.data, partition_id=k, num_partitions=fed.num_clients, seed=fed.seed
        )
        out.append((len(split.train_texts), len(split.test_texts)))
    return out


def _eps(history: list[tuple[float, float, int]]) -> float:
    from fedtune.privacy import compute_epsilon

    return compute_epsilon(history, delta=1e-5, accountant="prv", relation="replace-one")


def table(sigmas: list[float]) -> None:
    from fedtune.privacy.evaluation import EXAMPLE_BOUNDS, metric_std
    from fedtune.train.plan import privacy_plan

    loss_width = EXAMPLE_BOUNDS["eval-loss"][1] - EXAMPLE_BOUNDS["eval-loss"][0]
    print(
        "| federation | n_test per client | σ_eval | std accuracy (points) | std loss | "
        "ε evals alone | σ_train | ε train | ε train + evals | σ_train with room |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, file, overrides in FEDERATIONS:
        cfg = _config(file, **overrides)
        sizes = _sizes(cfg)
        n_train, n_test = min(sizes, key=lambda s: s[1])
        rounds = cfg.federation.num_rounds
        tests = sorted({t for _, t in sizes})
        plan = privacy_plan(cfg, num_train_examples=n_train) if cfg.privacy.enabled else None
        train = (
            [] if plan is None else [(plan.noise_multiplier, plan.sample_rate, plan.steps * rounds)]
        )
        for sigma in sigmas:
            evals = [(sigma, 1.0, rounds + 1)]
            acc = metric_std(noise_multiplier=sigma, num_examples=n_test, num_metrics=2, width=1.0)
            loss = metric_std(
                noise_multiplier=sigma, num_examples=n_test, num_metrics=2, width=loss_width
            )
            cells = [
                name,
                "/".join(map(str, tests)),
                f"{sigma:g}",
                f"{100 * acc:.2f}",
                f"{loss:.3f}",
                f"{_eps(evals):.3f}",
            ]
            if plan is None:
                cells += ["- (no DP)", "-", "-", "-"]
            else:
                from fedtune.config import ConfigError

                try:
                    room = privacy_plan(
                        cfg, num_train_examples=n_train, eval_noise_multiplier=sigma
                    ).noise_multiplier
                    with_room = f"{room:.3f}"
                except ConfigError:
                    with_room = "refused: evals alone ≥ target"
                cells += [
                    f"{plan.noise_multiplier:.3f}",
                    f"{_eps(train):.3f}",
                    f"{_eps(train + evals):.3f}",
                    with_room,
                ]
            print("| " + " | ".join(cells) + " |", flush=True)


def _draws(values: dict[str, np.ndarray], sigma: float, draws: int) -> np.ndarray:
    from fedtune.privacy.evaluation import release_metrics
    from fedtune.privacy.noise import CsprngNoise

    noise = CsprngNoise()
    return np.array(
        [
            list(release_metrics(values, noise_multiplier=sigma, noise=noise).metrics.values())
            for _ in range(draws)
        ]
    )


def real_evaluation(sigmas: list[float], draws: int) -> None:
    import torch

    from fedtune.train.loop import make_loader
    from fedtune.train.runtime import ClientRuntime

    cfg = _config("quickstart")
    torch.set_num_threads(2)
    start = time.perf_counter()
    runtime = ClientRuntime(cfg, partition_id=0, num_partitions=cfg.federation.num_clients)
    exact = runtime.evaluate(None, server_round=0)
    loader = make_loader(runtime.test_set, batch_size=64, shuffle=False, by_length=True)
    per = runtime.task.example_metrics(runtime.model, loader, device=runtime.device, cfg=cfg)
    values = {k: np.asarray(per[k], dtype=np.float64) for k in ("eval-loss", "eval-accuracy")}
    print(
        f"\nquickstart client 0, MiniLM-L6, initial adapter: n_test = {exact.num_examples}, exact "
        f"accuracy {exact.accuracy:.4f}, loss {exact.loss:.4f} "
        f"({time.perf_counter() - start:.1f} s to build and evaluate)"
    )
    for sigma in sigmas:
        d = _draws(values, sigma, draws)
        print(
            f"  σ_eval {sigma:g}: reported accuracy mean {d[:, 1].mean():.4f} std "
            f"{d[:, 1].std():.4f} (e.g. {', '.join(f'{v:.3f}' for v in d[:3, 1])}); loss mean "
            f"{d[:, 0].mean():.4f} std {d[:, 0].std():.4f} over {draws} draws"
        )


def silo_draws(sigmas: list[float], draws: int) -> None:
    cfg = _config("silos-private")
    n_test = min(t for _, t in _sizes(cfg))
    ones = round(SILO_EXACT_ACCURACY * n_test)
    acc = np.r_[np.ones(ones), np.zeros(n_test - ones)]
    values = {"eval-loss": np.zeros(n_test), "eval-accuracy": acc}  # the loss is not drawn
    print(f"\nsilo size: n_test = {n_test}, exact accuracy {ones / n_test:.4f} (docs/results.md)")
    for sigma in sigmas:
        d = _draws(values, sigma, draws)
        print(
            f"  σ_eval {sigma:g}: reported accuracy mean {d[:, 1].mean():.4f} std "
            f"{d[:, 1].std():.4f} (e.g. {', '.join(f'{v:.3f}' for v in d[:3, 1])})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sigmas", default="5,10,20", help="candidate σ_eval, comma-separated")
    parser.add_argument("--draws", type=int, default=2000, help="DP releases drawn per σ")
    parser.add_argument("--no-model", action="store_true", help="skip the real MiniLM evaluation")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sigmas = [float(s) for s in args.sigmas.split(",")]
    table(sigmas)
    if not args.no_model:
        real_evaluation(sigmas, args.draws)
    silo_draws(sigmas, args.draws)


if __name__ == "__main__":
    main()
