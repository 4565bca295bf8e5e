"""Memory of a client's own state: one process builds the clients of a 1000-client federation.

    python benchmarks/bench_client_state.py [--clients 1000]

The default model and all 48,994 WordNet definitions of the 8 categories
(``examples-per-label = 0``). The first client is built and evaluates once (so the
worker's shared model, tokenizer, data and codec exist); then the other clients are
built in the same process, as a simulation worker builds them on their first
message (each tokenises its partition into the worker's bounded LRU). It prints the
process's resident memory before and after, and the growth per additional client.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss() -> int:
    """This process's resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000, help="clients in the federation")
    args = parser.parse_args()

    from fedtune.config import parse_run_config
    from fedtune.train.runtime import ClientRuntime

    warnings.filterwarnings("ignore")
    n = args.clients
    privacy = Path(tempfile.mkdtemp(prefix="bench-client-state-"))
    cfg = parse_run_config({"num-clients": n, "examples-per-label": 0})
    kept = [ClientRuntime(cfg, partition_id=0, num_partitions=n, privacy_dir=privacy)]
    kept[0].evaluate(None, server_round=0)
    gc.collect()
    base = rss()
    start = time.perf_counter()
    for pid in range(1, n):
        kept.append(ClientRuntime(cfg, partition_id=pid, num_partitions=n, privacy_dir=privacy))
    gc.collect()
    end = rss()
    print(
        f"1 client: {base / 2**30:.2f} GiB; {n} clients: {end / 2**30:.2f} GiB; per additional "
        f"client {(end - base) / (n - 1) / 1024:.1f} KiB; {time.perf_counter() - start:.1f} s "
        f"for {n - 1} clients built"
    )


if __name__ == "__main__":
    main()
