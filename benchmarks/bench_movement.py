"""The key holders' movement bound on each shipped federation, and what it stops.

    python benchmarks/bench_movement.py [--train NAME ...]

For each ``simulations/*.toml`` it builds client 0 (its real model and partition,
nothing trained), prints its per-round ``L_inf`` bound (:func:`fedtune.movement.round_bound`
times the default ``max-step-slack``) and the move of the mean that two attacks cause
with equal clients: a +10 shift of one classifier-bias entry by one client
(``10 / num-clients``) and one client's update x50 (``49 / num-clients`` times its
honest move). ``--train quickstart`` also trains client 0 for one round from the
initial adapter and prints its honest largest move against the bound (one client's
round; the mean of equal clients moves at most as far).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEDERATIONS = ("quickstart", "private", "silos", "silos-private", "instruct", "preference")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", default=list(FEDERATIONS))
    parser.add_argument("--train", nargs="*", default=[], help="also train one round of these")
    args = parser.parse_args()

    import numpy as np

    from fedtune.config import load_toml, parse_run_config
    from fedtune.train.runtime import ClientRuntime

    for name in args.names:
        flat = load_toml(ROOT / "simulations" / f"{name}.toml")
        cfg = parse_run_config(flat)
        with tempfile.TemporaryDirectory() as tmp:
            runtime = ClientRuntime(
                cfg,
                partition_id=0,
                num_partitions=cfg.federation.num_clients,
                privacy_dir=Path(tmp),
            )
            bound = runtime.guard.bound
            k = cfg.federation.num_clients
            line = (
                f"{name:14s} n_0={runtime.num_train_examples:6d} d={runtime.initial.size:8d} "
                f"opt={cfg.train.optimizer:5s} dp={cfg.privacy.dp:7s} "
                f"bound/round={bound:.4g}  +10 bias -> {10 / k:.3g} "
                f"({'refused' if 10 / k > bound else 'PASSES'})"
            )
            if name in args.train:
                trained = runtime.train(None, server_round=1, sampled_clients=k)
                vector = runtime.codec.decode(trained.payload) / trained.num_examples  # type: ignore[arg-type]
                move = float(np.max(np.abs(vector - runtime.initial)))
                x50 = 49 / k * move
                line += (
                    f"  honest move={move:.4g} ({move / bound:.2f} of bound); x50 -> {x50:.3g} "
                    f"({'refused' if x50 > bound else 'PASSES'})"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
