"""Cost of the exact discrete Gaussian: client-level shares and DP-SGD steps on the grid.

    python benchmarks/bench_discrete_noise.py [--dim 100000] [--sgd] [--batch 64] [--accounting]

Client level: one share for σ = 1, C = 1, m = 10 sampled clients, t = 1 (CSPRNG keys):
``fedtune.privacy.discrete.discrete_noisy_update`` (what ``dp = "client"`` releases, drawn
by the vectorised sampler), the scalar reference sampler on 2,000 values, and
``fedtune.privacy.client_level.distributed_noise`` (float64 shares). ``--sgd``: the median
``optimizer.step`` of ``fedtune.privacy.optimizer.sourced_dp_optimizer`` (grid) against
Opacus' ``DPOptimizer`` (float noise, the cost of the float path this replaced) on one
``Linear(76808, 1)`` layer (the quickstart's trainable size) with ``--batch`` examples.
Prints the load average: the times scale with it on a shared machine. ``--accounting``
(no timing): ε of the quickstart, private and silos-private DP settings under the PRV
accountant of the continuous Gaussian against ``discrete-rdp``, the one proven for the grid,
and the σ each needs for ``target-epsilon``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtune.privacy.client_level import distributed_noise  # noqa: E402
from fedtune.privacy.discrete import (  # noqa: E402
    KeystreamRandom,
    discrete_gaussian,
    discrete_noisy_update,
)
from fedtune.privacy.noise import CsprngNoise  # noqa: E402


def client_level(dim: int) -> None:
    """Time one share of each kind and print the figures."""
    kw = {"noise_multiplier": 1.0, "clip_norm": 1.0, "num_sampled_clients": 10, "tolerance": 1}
    discrete_noisy_update(np.zeros(100), rng=KeystreamRandom(CsprngNoise()), **kw)  # type: ignore[arg-type]  # warm-up
    start = time.perf_counter()
    out = discrete_noisy_update(np.zeros(dim), rng=KeystreamRandom(CsprngNoise()), **kw)  # type: ignore[arg-type]
    vector = time.perf_counter() - start
    rng, sigma2, few = KeystreamRandom(CsprngNoise()), Fraction(out.share_variance), 2000
    start = time.perf_counter()
    for _ in range(few):
        discrete_gaussian(sigma2, rng)
    scalar = (time.perf_counter() - start) / few
    start = time.perf_counter()
    distributed_noise(dim, noise=CsprngNoise(), **kw)  # type: ignore[arg-type]
    continuous = time.perf_counter() - start
    print(
        f"d = {dim}: discrete (vectorised) {vector:.3f} s ({vector / dim * 1e6:.2f} us a value), "
        f"scalar sampler {scalar * 1e6:.0f} us a value, continuous {continuous * 1e3:.1f} ms; "
        f"grid 2^{int(np.log2(out.grid))}, s = {float(out.share_variance) ** 0.5:.0f} grid "
        f"steps, sigma_eff / sigma = {out.effective_noise_multiplier:.5f}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


def sgd(batch: int, dim: int = 76_808, steps: int = 7) -> None:
    """Median ``optimizer.step`` CPU time: grid, fedtune's float path, Opacus' float noise."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from torch import nn

    from fedtune.privacy.noise import SeededNoise
    from fedtune.privacy.optimizer import sourced_dp_optimizer

    torch.set_num_threads(1)

    def median_step(make) -> float:  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = GradSampleModule(nn.Linear(dim, 1, bias=False))
        opt = make(torch.optim.SGD(model.parameters(), lr=0.1))
        x, times = torch.randn(batch, dim), []
        for _ in range(steps):
            opt.zero_grad()
            model(x).sum().backward()
            start = time.process_time()  # CPU time: less sensitive to a shared machine
            opt.step()
            times.append(time.process_time() - start)
        return sorted(times)[steps // 2]

    kw = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": batch}
    source = sourced_dp_optimizer()
    grid = median_step(lambda o: source(o, noise=SeededNoise(0), **kw))
    ours = median_step(lambda o: source(o, noise=SeededNoise(0), grid=False, **kw))
    floats = median_step(lambda o: DPOptimizer(o, **kw))
    print(
        f"DP-SGD optimizer.step (CPU time, 1 thread), d = {dim}, {batch} examples: grid "
        f"{grid * 1e3:.1f} ms, float (dp-noise = float) {ours * 1e3:.1f} ms, Opacus "
        f"{floats * 1e3:.1f} ms; grid / float {grid / ours:.1f}x; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


#: (federation file, n_k): n_k is the training split of one client (test-fraction 0.2):
#: 2,000 definitions over 4 clients (quickstart, private), ~12,250 a silo (silos-private).
#: quickstart.toml runs without DP: its batch, epochs and rounds with dp = "example".
ACCOUNTING_RUNS = (("quickstart.toml", 400), ("private.toml", 400), ("silos-private.toml", 9_800))


def accounting() -> None:
    """ε(PRV, continuous) vs ε(discrete-rdp, proven) at the σ PRV calibrates, and the σ
    each accountant calibrates for target-epsilon, per federation (with the node's DP
    evaluations at eval-noise-multiplier, once per round plus the initial adapter)."""
    from fedtune.config import parse_run_config
    from fedtune.config.parse import load_toml
    from fedtune.privacy.accountant import compute_epsilon
    from fedtune.privacy.budget import calibrate_noise

    root = Path(__file__).resolve().parents[1] / "simulations"
    for name, n in ACCOUNTING_RUNS:
        cfg = parse_run_config({**load_toml(root / name), "dp": "example"})
        p, rounds = cfg.privacy, cfg.federation.num_rounds
        q = min(1.0, cfg.train.batch_size / n)
        steps = cfg.train.local_epochs * int(1 / q) * rounds
        extra = [(p.eval_noise_multiplier, 1.0, rounds + 1)]
        kw = {"target_epsilon": p.target_epsilon, "target_delta": p.target_delta}
        sigmas = {
            m: calibrate_noise(
                sample_rate=q,
                steps=steps,
                accountant="prv",
                relation="replace-one",
                extra=extra,
                mechanism=m,
                **kw,  # type: ignore[arg-type]
            )
            for m in ("gaussian", "discrete-gaussian")
        }
        history = [(sigmas["gaussian"], q, steps), *extra]
        eps = {
            a: compute_epsilon(history, delta=p.target_delta, accountant=a, relation="replace-one")  # type: ignore[arg-type]
            for a in ("prv", "rdp", "discrete-rdp")
        }
        print(
            f"{name}: n_k={n} q={q:.4f} steps={steps} (+{rounds + 1} evals at "
            f"σ={p.eval_noise_multiplier:g}), δ={p.target_delta:g}: at σ={sigmas['gaussian']:.4f} "
            f"ε prv={eps['prv']:.3f} rdp={eps['rdp']:.3f} discrete-rdp={eps['discrete-rdp']:.3f}; "
            f"σ for ε={p.target_epsilon:g}: prv {sigmas['gaussian']:.4f}, discrete-rdp "
            f"{sigmas['discrete-gaussian']:.4f} "
            f"(x{sigmas['discrete-gaussian'] / sigmas['gaussian']:.2f})"
        )


def main() -> None:
    """Parse the arguments and run the benchmarks asked for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=100_000, help="adapter size d")
    parser.add_argument("--sgd", action="store_true", help="also time DP-SGD steps")
    parser.add_argument("--batch", type=int, default=64, help="examples per DP-SGD step")
    parser.add_argument("--accounting", action="store_true", help="only the ε table")
    args = parser.parse_args()
    if args.accounting:
        accounting()
        return
    client_level(args.dim)
    if args.sgd:
        sgd(args.batch)


if __name__ == "__main__":
    main()
