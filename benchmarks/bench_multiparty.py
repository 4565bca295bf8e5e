"""What multiparty CKKS costs, against shared-key CKKS, on the default adapter's size.

Run on demand::

    python benchmarks/bench_multiparty.py                      # about 1 min on 2 idle cores
    python benchmarks/bench_multiparty.py --clients 10 --threshold 7 --rounds 2

No training: every client's update is a random vector of ``--length`` values (default
76,808, the quickstart adapter), scaled by ``--examples``. Per round, both federations
do their cryptography one party after another in this process:

* shared-key ``ckks`` (:mod:`fedtune.crypto` defaults): each client encrypts, the server
  validates and adds, one key holder decrypts (every key holder does the same, once);
* ``ckks-multiparty`` (:mod:`fedtune.secure.multiparty`): each client encrypts under its
  own key and signs, the server validates, adds and makes receipts, each key holder of
  the quorum checks the receipts and partially decrypts, the server combines.

Printed: the key ceremony's time (all parties, one process); bytes per parameter up,
aggregate and per partial decryption; each step's time; the cryptography's time per
round, multiparty / shared-key; and the largest ``|decrypted sum - plain sum|``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedtune import crypto
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.codec import payload_nbytes
from fedtune.secure.multiparty import protocol as mp
from fedtune.secure.multiparty.params import MultipartyParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threshold", type=int, default=None, help="default: all clients")
    ap.add_argument("--length", type=int, default=76_808)
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    n, length = args.clients, args.length
    t = n if args.threshold is None else args.threshold
    params = MultipartyParams()
    rng = np.random.default_rng(0)

    # ---- keys
    start = time.perf_counter()
    shared = crypto.make_secret_context()
    shared_keygen = time.perf_counter() - start
    start = time.perf_counter()
    names = [f"node-{i}" for i in range(n)]
    roster, parties = mp.ceremony(names, run="bench", threshold=t, params=params)
    ceremony = time.perf_counter() - start
    public = mp.public_context(roster)
    sk_server = CkksCodec(crypto.public_context(shared), length=length)
    sk_client = CkksCodec(shared, length=length)
    mp_server = CkksCodec(public, length=length)
    share_bytes = sum(len(d) for d in [parties[0].shares[names[0]].tobytes()])
    print(f"clients {n}, threshold {t}, length {length}, examples per client {args.examples}")
    print(
        f"smudging: uniform, {params.smudging_bits} bits; statistical security "
        f"{params.security_bits} bits over {params.max_rounds} rounds, "
        f"{params.max_uploads} uploads per sum"
    )
    print(
        f"keygen: shared-key {shared_keygen * 1e3:.0f} ms; multiparty ceremony "
        f"{ceremony * 1e3:.0f} ms for all {n} parties in one process "
        f"({ceremony / n * 1e3:.0f} ms per party); each party keeps {n} shares of "
        f"{share_bytes / 1024:.0f} KiB"
    )

    times: dict[str, list[float]] = {}

    def timed(key: str, fn, *a, **kw):  # type: ignore[no-untyped-def]
        s = time.perf_counter()
        out = fn(*a, **kw)
        times.setdefault(key, []).append(time.perf_counter() - s)
        return out

    worst_sk = worst_mp = 0.0
    sizes: dict[str, float] = {}
    for rnd in range(1, args.rounds + 1):
        values = [rng.normal(size=length) * 0.05 * args.examples for _ in range(n)]
        truth = np.sum(values, axis=0)
        # shared key
        ups = [timed("sk encrypt", sk_client.encode, v) for v in values]
        ups = [timed("sk validate", sk_server.validate, u) for u in ups]
        agg = timed("sk add", sk_server.add, ups)
        out = timed("sk decrypt", sk_client.decode, agg)
        worst_sk = max(worst_sk, float(np.abs(out - truth).max()))
        sizes["sk up"] = payload_nbytes(ups[0]) / length
        sizes["sk agg"] = payload_nbytes(agg) / length
        # multiparty
        ups, recs = [], []
        for party, v in zip(parties, values, strict=True):
            pl = timed("mp encrypt", party.encrypt, v)
            sig = timed("mp sign", party.sign, pl, server_round=rnd, num_examples=args.examples)
            pl = timed("mp validate", mp_server.validate, pl)
            recs.append(
                timed(
                    "mp receipt",
                    mp.make_receipt,
                    public,
                    pl,
                    sig,
                    name=party.name,
                    num_examples=args.examples,
                )
            )
            ups.append(pl)
        agg = timed("mp add", mp_server.add, ups)
        req = mp.DecryptionRequest(rnd, tuple(recs), n * args.examples, tuple(names[:t]))
        partials = [timed("mp partial", p.partial, req, min_count=2) for p in parties[:t]]
        out = timed("mp combine", mp.combine, roster, agg, req, partials)
        worst_mp = max(worst_mp, float(np.abs(out - truth).max()))
        sizes["mp up"] = payload_nbytes(ups[0]) / length
        sizes["mp agg"] = payload_nbytes(agg) / length
        sizes["mp partial"] = partials[0].nbytes / length
        sizes["mp receipt"] = (len(recs[0].seeds) + 32 + 64) / length

    print(
        "bytes per parameter: "
        f"shared-key up {sizes['sk up']:.2f} / aggregate {sizes['sk agg']:.2f}; "
        f"multiparty up {sizes['mp up']:.2f} / aggregate {sizes['mp agg']:.2f} / "
        f"partial decryption {sizes['mp partial']:.2f} per key holder "
        f"(+ receipts {sizes['mp receipt']:.4f} per upload)"
    )
    per_round = {k: sum(v) / args.rounds for k, v in times.items()}
    for k, v in sorted(times.items()):
        print(f"  {k:12s} {np.mean(v) * 1e3:8.1f} ms per call ({len(v) // args.rounds}/round)")
    # every key holder decrypts once in shared-key CKKS (each on its own machine): count one
    sk_round = sum(v for k, v in per_round.items() if k.startswith("sk"))
    mp_round = sum(v for k, v in per_round.items() if k.startswith("mp"))
    # parallel view: clients encrypt and key holders decrypt on their own machines
    sk_par = (
        (per_round["sk encrypt"] + per_round["sk validate"]) / n
        + per_round["sk add"]
        + per_round["sk decrypt"]
    )
    mp_par = (
        (per_round["mp encrypt"] + per_round["mp sign"]) / n
        + per_round["mp validate"]
        + per_round["mp receipt"]
        + per_round["mp add"]
        + per_round["mp partial"] / t
        + per_round["mp combine"]
    )
    print(
        f"crypto per round, one process: shared-key {sk_round * 1e3:.0f} ms, multiparty "
        f"{mp_round * 1e3:.0f} ms ({mp_round / sk_round:.2f}x)"
    )
    print(
        f"crypto on the critical path (parties in parallel): shared-key {sk_par * 1e3:.0f} ms, "
        f"multiparty {mp_par * 1e3:.0f} ms ({mp_par / sk_par:.2f}x)"
    )
    print(
        f"max |decrypted sum - plain sum|: shared-key {worst_sk:.3g}, multiparty "
        f"{worst_mp:.3g} (predicted sd {params.decoded_error_std(t):.3g}); of the mean "
        f"(/ {n * args.examples} examples): {worst_mp / (n * args.examples):.3g}"
    )


if __name__ == "__main__":
    main()
