"""DP-SGD round time / plain round time for the causal-LM federation, measured in one run.

    python benchmarks/bench_dp_lm.py [--repeats 2]

One client of ``simulations/instruct.toml`` (SmolLM2-135M-Instruct, FFA-LoRA r=4 on
q_proj/v_proj, 16 WordNet pairs, batch 8, one local epoch) trains one local round with
``dp = "off"`` and one with ``dp = "example"`` (Opacus per-example gradients on the LoRA B
matrices, clipping, noise), interleaved so that machine noise hits both alike.
Encryption is off here: it is not part of local training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds of each kind")
    args = parser.parse_args()

    from fedtune.config import load_toml, parse_run_config
    from fedtune.train.runtime import ClientRuntime

    warnings.filterwarnings("ignore")
    flat = {**load_toml(ROOT / "simulations" / "instruct.toml"), "encryption": False}
    ledger = Path(tempfile.mkdtemp(prefix="bench-dp-lm-"))
    plain = ClientRuntime(parse_run_config({**flat, "dp": "off"}), partition_id=0, num_partitions=4)
    # A large budget: this measures time, the rounds are not a real run.
    dp = ClientRuntime(
        parse_run_config({**flat, "epsilon-budget": 1e6}),
        partition_id=0,
        num_partitions=4,
        privacy_dir=ledger,
    )
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for rep in range(args.repeats):
        for name, client in (("plain", plain), ("dp", dp)):
            start = time.perf_counter()
            outcome = client.train(None, server_round=rep + 1)
            times[name].append(time.perf_counter() - start)
            assert outcome.result is not None
            print(
                f"round {rep + 1} {name:5s} {times[name][-1]:6.2f} s "
                f"({outcome.result.steps} steps, {outcome.result.num_examples} examples)",
                flush=True,
            )
    total_dp, total_plain = sum(times["dp"]), sum(times["plain"])
    print(
        f"DP / plain local round time: {total_dp:.1f} s / {total_plain:.1f} s = "
        f"{total_dp / total_plain:.3f}"
    )


if __name__ == "__main__":
    main()
