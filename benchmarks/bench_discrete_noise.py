"""Cost of client-level noise: the exact discrete Gaussian shares against the float ones.

    python benchmarks/bench_discrete_noise.py [--dim 100000]

One client's share for σ = 1, C = 1, m = 10 sampled clients, t = 1 (CSPRNG keys):
``fedtune.privacy.discrete.discrete_noisy_update`` (what ``dp = "client"`` releases) and
``fedtune.privacy.client_level.distributed_noise`` (the float64 shares it replaced). It
prints both times, the grid step, the share's scale in grid steps and σ_eff / σ, and the
load average (the times scale with it on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtune.privacy.client_level import distributed_noise  # noqa: E402
from fedtune.privacy.discrete import KeystreamRandom, discrete_noisy_update  # noqa: E402
from fedtune.privacy.noise import CsprngNoise  # noqa: E402


def main() -> None:
    """Time one share of each kind and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=100_000, help="adapter size d")
    dim = parser.parse_args().dim
    kw = {"noise_multiplier": 1.0, "clip_norm": 1.0, "num_sampled_clients": 10, "tolerance": 1}
    start = time.perf_counter()
    out = discrete_noisy_update(np.zeros(dim), rng=KeystreamRandom(CsprngNoise()), **kw)  # type: ignore[arg-type]
    discrete = time.perf_counter() - start
    start = time.perf_counter()
    distributed_noise(dim, noise=CsprngNoise(), **kw)  # type: ignore[arg-type]
    continuous = time.perf_counter() - start
    print(
        f"d = {dim}: discrete {discrete:.2f} s ({discrete / dim * 1e6:.0f} us a value), "
        f"continuous {continuous * 1e3:.1f} ms; grid 2^{int(np.log2(out.grid))}, "
        f"s = {float(out.share_variance) ** 0.5:.0f} grid steps, "
        f"sigma_eff / sigma = {out.effective_noise_multiplier:.5f}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
