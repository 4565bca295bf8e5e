"""Write one CSV per demo node from the bundled WordNet data (for trying a deployment).

    python scripts/make_demo_data.py --nodes 3 --out deploy/data [--examples-per-label 250]

In a real federation every node already has its own file; this only stands in
for that on one machine. Each ``node-K.csv`` holds one IID partition (columns
``text``, ``label``), drawn with flwr-datasets exactly as a simulation would.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fedtune.config import DataConfig
from fedtune.data import load_data, partition_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="number of node files (default 3)")
    parser.add_argument("--out", type=Path, required=True, help="directory for node-K.csv")
    parser.add_argument("--examples-per-label", type=int, default=250)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if args.nodes < 1:
        parser.error(f"--nodes must be >= 1, got {args.nodes}")
    cfg = DataConfig(examples_per_label=args.examples_per_label)
    data = load_data(cfg, seed=args.seed)
    parts = partition_indices(data.labels, cfg, num_partitions=args.nodes, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for k, indices in enumerate(parts):
        path = args.out / f"node-{k}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows((data.texts[i], data.label_names[data.labels[i]]) for i in indices)
        print(f"{path}: {len(indices)} examples")
    print(f"label-names = {','.join(data.label_names)!r}")


if __name__ == "__main__":
    main()
