"""Measure the CKKS aggregation module: wire size, throughput, precision.

Run on demand::

    python benchmarks/bench_crypto.py                 # 100k and 150k parameters
    python benchmarks/bench_crypto.py --lengths 1000000 --clients 10

For each candidate parameter set it reports bytes per parameter of a client
upload (seeded) and of the server's aggregate (unseeded), the worst absolute
error of the decrypted weighted mean against numpy in two corners of the
operating envelope, and the usable range; then it names the candidate with
the smallest upload that meets the requirements, which is how
``DEFAULT_PARAMS`` was chosen. The TenSEAL high-level API (``ts.ckks_vector``)
is measured as the baseline it replaced.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedtune.crypto import (
    DEFAULT_PARAMS,
    CkksParams,
    decrypt_vector,
    encrypt_vector,
    make_secret_context,
    public_context,
    sum_encrypted,
)

REQUIRED_RANGE = 1e7  # 100 clients x 1e5 examples x |w| <= 1
REQUIRED_ERROR = 1e-7  # 10x below the 1e-6 the training tolerates

CANDIDATES = (
    CkksParams(
        poly_modulus_degree=2048, coeff_mod_bit_sizes=(54,), global_scale_bits=29
    ),
    CkksParams(
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(56,), global_scale_bits=30
    ),
    CkksParams(
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(58,), global_scale_bits=32
    ),
    CkksParams(
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(60,), global_scale_bits=34
    ),
    CkksParams(
        poly_modulus_degree=8192, coeff_mod_bit_sizes=(60,), global_scale_bits=34
    ),
)


def mean_error(params: CkksParams, counts: list[int], length: int, seed: int) -> float:
    """Worst |decrypted weighted mean - numpy weighted mean| for clients with ``counts``."""
    rng = np.random.default_rng(seed)
    ctx = make_secret_context(params)
    ws = [rng.uniform(-1.0, 1.0, length) for _ in counts]
    total = sum(counts)
    enc = sum_encrypted(
        public_context(ctx),
        [encrypt_vector(ctx, w, scale=n) for w, n in zip(ws, counts, strict=True)],
    )
    expected = np.sum([n * w for n, w in zip(counts, ws, strict=True)], axis=0) / total
    return float(np.max(np.abs(decrypt_vector(ctx, enc) / total - expected)))


def measure(
    params: CkksParams, length: int, clients: int, seed: int
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    ctx = make_secret_context(params)
    pub = public_context(ctx)
    ws = [rng.normal(0.0, 0.1, length) for _ in range(clients)]
    counts = [int(c) for c in rng.integers(1, 100_000, clients)]
    t0 = time.perf_counter()
    encs = [encrypt_vector(ctx, w, scale=n) for w, n in zip(ws, counts, strict=True)]
    t1 = time.perf_counter()
    agg = sum_encrypted(pub, encs)
    t2 = time.perf_counter()
    out = decrypt_vector(ctx, agg)
    t3 = time.perf_counter()
    expected = np.sum([n * w for n, w in zip(counts, ws, strict=True)], axis=0) / sum(
        counts
    )
    return {
        "upload_bpp": encs[0].nbytes / length,
        "aggregate_bpp": agg.nbytes / length,
        "encrypt_pps": clients * length / (t1 - t0),
        "sum_pps": clients * length / (t2 - t1),
        "decrypt_pps": length / (t3 - t2),
        "err": float(np.max(np.abs(out / sum(counts) - expected))),
    }


def tenseal_baseline(length: int) -> None:
    """Wire size of the TenSEAL high-level API this module replaced."""
    import tenseal as ts

    x = np.random.default_rng(0).uniform(-1, 1, length).tolist()
    for name, enc_type in (
        ("public-key", ts.ENCRYPTION_TYPE.ASYMMETRIC),
        ("symmetric", ts.ENCRYPTION_TYPE.SYMMETRIC),
    ):
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            4096,
            coeff_mod_bit_sizes=[60, 49],
            encryption_type=enc_type,
        )
        ctx.global_scale = 2.0**34
        size = sum(
            len(ts.ckks_vector(ctx, x[i : i + 2048]).serialize())
            for i in range(0, length, 2048)
        )
        print(
            f"  ts.ckks_vector N=4096 [60,49] {name:10s}: {size / length:6.2f} B/param"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[100_000, 150_000])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(
        "Candidates (error corners: one client with n=1; 100 clients with n up to 1e5)"
    )
    print(
        f"{'params':44s} {'up B/p':>7s} {'agg B/p':>7s} {'range':>9s} {'err n=1':>9s} {'err K=100':>9s}  ok"
    )
    best: CkksParams | None = None
    best_bpp = float("inf")
    for p in CANDIDATES:
        m = measure(p, args.lengths[-1], 1, args.seed)
        e1 = mean_error(p, [1], 8192, args.seed)
        counts = [
            int(c) for c in np.random.default_rng(args.seed).integers(1, 100_001, 100)
        ]
        e100 = mean_error(p, counts, 8192, args.seed)
        ok = p.max_abs_value >= REQUIRED_RANGE and max(e1, e100) <= REQUIRED_ERROR
        label = f"N={p.poly_modulus_degree} q={p.coeff_mod_bit_sizes} scale=2^{p.global_scale_bits}"
        print(
            f"{label:44s} {m['upload_bpp']:7.2f} {m['aggregate_bpp']:7.2f} "
            f"{p.max_abs_value:9.2e} {e1:9.2e} {e100:9.2e}  {'yes' if ok else 'no'}"
        )
        if ok and m["upload_bpp"] < best_bpp:
            best, best_bpp = p, m["upload_bpp"]
    print(
        f"smallest upload meeting range >= {REQUIRED_RANGE:g} and error <= {REQUIRED_ERROR:g}: {best}"
    )
    print(f"DEFAULT_PARAMS: {DEFAULT_PARAMS}")
    print("Baseline (TenSEAL high-level API, real slots, unseeded):")
    tenseal_baseline(args.lengths[-1])

    print(
        f"\nDEFAULT_PARAMS, {args.clients} clients, n_k uniform in [1, 1e5), w ~ N(0, 0.1):"
    )
    for length in args.lengths:
        m = measure(DEFAULT_PARAMS, length, args.clients, args.seed)
        print(
            f"  length {length:>9,d}: upload {m['upload_bpp']:.2f} B/param, aggregate "
            f"{m['aggregate_bpp']:.2f} B/param; encrypt {m['encrypt_pps']:,.0f} params/s, "
            f"sum {m['sum_pps']:,.0f} params/s (per input), decrypt {m['decrypt_pps']:,.0f} "
            f"params/s; max |mean error| {m['err']:.2e}"
        )


if __name__ == "__main__":
    main()
