"""What verified aggregation costs: the server's receipts and a key holder's checks.

Run on demand::

    python benchmarks/bench_verify.py                  # 76,808 values, 4 and 10 uploads
    python benchmarks/bench_verify.py --length 1000000 --clients 4
    python benchmarks/bench_verify.py --flips 1000     # single-bit flips of an upload

For each number of uploads it prints the server's time to validate the uploads and
make their receipts, a key holder's time for :func:`fedtune.secure.verify.check_global`
(tags, counts, the ``c1`` equation) against its time to decrypt the same sum, and the
bytes of one receipt beside one upload. With ``--flips N`` it flips one random bit
of an upload's first chunk N times and counts how many flips pass the server's
checks, and how many of those a key holder then names (``bad-tags``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedtune import crypto
from fedtune.secure import receipt_io, verify
from fedtune.secure.ckks import CkksCodec

_KEYS = ("chunks", "length", "fingerprint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=76_808)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--flips", type=int, default=0)
    args = parser.parse_args()
    if args.flips:
        flips(args.flips, args.length)
        return
    ctx = crypto.make_secret_context()
    holder = CkksCodec(ctx, length=args.length)
    server = CkksCodec(crypto.public_context(ctx), length=args.length)
    rng = np.random.default_rng(0)
    for k in args.clients:
        ups = [
            verify.sign_upload(
                holder,
                holder.encode(rng.uniform(-1, 1, args.length)),
                run="bench",
                server_round=1,
                name=f"c{i}",
                num_examples=3,
            )
            for i in range(k)
        ]
        start = time.perf_counter()
        receipts = [
            verify.make_receipt(
                server,
                server.validate({key: u[key] for key in _KEYS}),
                u["tag"],
                name=f"c{i}",
                num_examples=3,
            )
            for i, u in enumerate(ups)
        ]
        t_server = time.perf_counter() - start
        total = server.add([{key: u[key] for key in _KEYS} for u in ups])
        record = {**total, "num-examples": 3 * k, **verify.receipts_to_record(receipts)}  # type: ignore[arg-type]
        start = time.perf_counter()
        verify.check_global(
            holder,
            record,
            total,
            3 * k,
            run="bench",
            server_round=1,
            min_count=2,
            used=verify.UsedGlobals(None),
        )
        t_check = time.perf_counter() - start
        start = time.perf_counter()
        holder.decode(total)
        t_decrypt = time.perf_counter() - start
        receipt = len(receipt_io.receipts_to_bytes([r for r in receipts[:1] if r is not None]))
        upload = sum(len(c) for c in ups[0]["chunks"])
        print(
            f"{k} uploads of {args.length} values: server validate + receipts {t_server:.3f} s; "
            f"key holder check {t_check:.3f} s, decrypt {t_decrypt:.3f} s; "
            f"receipt {receipt} B per upload of {upload} B"
        )


def flips(count: int, length: int) -> None:
    """Bit flips of an honest upload: passed by the server, then named by a key holder."""
    ctx = crypto.make_secret_context()
    holder = CkksCodec(ctx, length=length)
    server = CkksCodec(crypto.public_context(ctx), length=length)
    rng = np.random.default_rng(0)
    ups = [
        verify.sign_upload(
            holder,
            holder.encode(rng.uniform(-1, 1, length)),
            run="bench",
            server_round=1,
            name=f"c{i}",
            num_examples=1,
        )
        for i in range(3)
    ]
    others = [{key: u[key] for key in _KEYS} for u in ups[1:]]
    receipts = [
        verify.make_receipt(server, p, u["tag"], name=f"c{i + 1}", num_examples=1)
        for i, (p, u) in enumerate(zip(others, ups[1:], strict=True))
    ]
    passed = named = 0
    for _ in range(count):
        chunk = bytearray(ups[0]["chunks"][0])
        chunk[int(rng.integers(16, len(chunk)))] ^= 1 << int(rng.integers(8))
        bad = {key: ups[0][key] for key in _KEYS} | {
            "chunks": [bytes(chunk), *ups[0]["chunks"][1:]]
        }
        try:
            checked = server.validate(bad)
        except ValueError:
            continue
        passed += 1
        first = verify.make_receipt(server, checked, ups[0]["tag"], name="c0", num_examples=1)
        items = [r for r in [first, *receipts] if r is not None]
        total = server.add([checked, *others])
        try:
            verify.check_global(
                holder,
                {**total, **verify.receipts_to_record(items)},
                total,
                3,
                run="bench",
                server_round=1,
                min_count=2,
                used=verify.UsedGlobals(None),
            )
        except verify.GlobalRefused as err:
            named += err.code == f"{verify.BAD_TAGS}:0"
    print(
        f"{count} single-bit flips of an upload's first chunk: {passed} passed the server's "
        f"checks and were summed; a key holder named {named} of them (bad-tags:0)"
    )


if __name__ == "__main__":
    main()
