"""Survival of the aggregator under corrupted payloads.

Two layers. The first tests run mutations of the *outer* bytes through
``validate_wire`` then ``sum_encrypted`` in this process. The last one,
:func:`test_server_path_survives_inner_mutations`, mutates what lies *inside*
the compression (the inner SEAL headers, metadata, coefficients, seed) and
the zstd frame itself, recompresses, and sends 5,000 such payloads through the
exact server path (``CkksCodec(public context).validate`` then ``add``) in a
child process, ``python tests/test_crypto_fuzz.py CASES SEED``: before
:mod:`fedtune.crypto.seal_format`, some of them aborted the process from
inside SEAL, which must fail the test rather than kill pytest.

Bit flips can yield a well-formed encryption of other values, which no
aggregator can detect; those must then be *added correctly* (the sum's
coefficients are the inputs' sum modulo q).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtune.crypto import (
    DEFAULT_PARAMS,
    CkksContext,
    EncryptedVector,
    PayloadError,
    encrypt_vector,
    make_secret_context,
    public_context,
    sum_encrypted,
    validate_wire,
)

LENGTH = DEFAULT_PARAMS.values_per_chunk + 5  # two chunks
CASES_PER_KIND = 30


@pytest.fixture(scope="module")
def setup() -> tuple[CkksContext, CkksContext, EncryptedVector, EncryptedVector]:
    ctx = make_secret_context(DEFAULT_PARAMS)
    pub = public_context(ctx)
    rng = np.random.default_rng(0)
    good = encrypt_vector(ctx, rng.uniform(-1, 1, LENGTH), scale=10.0)
    other = encrypt_vector(ctx, rng.uniform(-1, 1, LENGTH), scale=3.0)
    return ctx, pub, good, other


def _receive(pub: CkksContext, payload: Any, reference: EncryptedVector) -> EncryptedVector:
    enc = validate_wire(
        payload,
        params=pub.params,
        expected_fingerprint=pub.fingerprint,
        expected_length=LENGTH,
    )
    return sum_encrypted(pub, [reference, enc])


def _with_chunk(wire: dict[str, Any], chunk: bytes, index: int = 1) -> dict[str, Any]:
    chunks = list(wire["chunks"])
    chunks[index] = chunk
    return {**wire, "chunks": chunks}


Mutator = Callable[[random.Random, dict[str, Any]], Any]


def _truncate(r: random.Random, w: dict[str, Any]) -> Any:
    c = w["chunks"][1]
    return _with_chunk(w, c[: r.randrange(len(c))])


def _oversize(r: random.Random, w: dict[str, Any]) -> Any:
    return _with_chunk(w, w["chunks"][1] + r.randbytes(DEFAULT_PARAMS.max_chunk_bytes(polys=1)))


def _append(r: random.Random, w: dict[str, Any]) -> Any:
    return _with_chunk(w, w["chunks"][1] + r.randbytes(r.randint(1, 64)))


def _random_bytes(r: random.Random, w: dict[str, Any]) -> Any:
    return _with_chunk(w, r.randbytes(len(w["chunks"][1])))


def _garbage_body(r: random.Random, w: dict[str, Any]) -> Any:
    c = w["chunks"][1]
    return _with_chunk(w, c[:16] + r.randbytes(len(c) - 16))


def _header_flip(r: random.Random, w: dict[str, Any]) -> Any:
    c = bytearray(w["chunks"][1])
    i = r.choice([0, 1, 2, 3, 4, 6, 7, 8, 9, 10])  # every field but the compression mode
    c[i] ^= 1 << r.randrange(8)
    return _with_chunk(w, bytes(c))


def _wrong_count(r: random.Random, w: dict[str, Any]) -> Any:
    chunks = list(w["chunks"])
    return {**w, "chunks": chunks[:1] if r.random() < 0.5 else chunks + chunks[:1]}


def _wrong_type(r: random.Random, w: dict[str, Any]) -> Any:
    return r.choice(
        [
            None,
            [w],
            {**w, "chunks": "abc"},
            {**w, "chunks": [bytearray(c) for c in w["chunks"]]},
            {**w, "chunks": [str(c) for c in w["chunks"]]},
            {**w, "length": str(LENGTH)},
            {**w, "length": True},
            {**w, "length": float(LENGTH)},
            {**w, "fingerprint": w["fingerprint"].encode()},
            {**w, "extra": 1},
            {k: v for k, v in w.items() if k != "length"},
        ]
    )


def _wrong_length(r: random.Random, w: dict[str, Any]) -> Any:
    return {**w, "length": r.choice([0, -1, LENGTH - 1, LENGTH + 1, 10**12])}


MUST_REJECT: dict[str, tuple[Mutator, str]] = {
    "truncated": (_truncate, r"chunks\[1\]"),
    "oversized": (
        _oversize,
        r"`chunks\[1\]` is \d+ bytes; a ciphertext .* takes between",
    ),
    "appended": (
        _append,
        r"`chunks\[1\]` declares \d+ bytes in its SEAL header but has \d+",
    ),
    "random_bytes": (_random_bytes, r"`chunks\[1\]` does not start with a SEAL header"),
    "garbage_body": (
        _garbage_body,
        r"`items\[1\]\.chunks\[1\]` (declares zstd but its body is not a zstd frame"
        r"|does not decompress)",
    ),
    "header_flip": (_header_flip, r"`chunks\[1\]`"),
    "wrong_count": (
        _wrong_count,
        r"`chunks` should hold 2 ciphertexts for length 4101, got [13]",
    ),
    "wrong_type": (
        _wrong_type,
        r"payload|`chunks|`length` should be an int|`fingerprint` should be a str",
    ),
    "wrong_length": (_wrong_length, r"`length` should be 4101, got"),
}


@pytest.mark.parametrize("kind", sorted(MUST_REJECT))
def test_corrupted_payload_rejected(
    setup: tuple[CkksContext, CkksContext, EncryptedVector, EncryptedVector], kind: str
) -> None:
    _, pub, good, other = setup
    mutate, match = MUST_REJECT[kind]
    r = random.Random(kind)
    for _ in range(CASES_PER_KIND):
        payload = mutate(r, good.to_wire())
        with pytest.raises(PayloadError, match=match):
            _receive(pub, payload, other)


def test_body_bit_flips_never_crash(
    setup: tuple[CkksContext, CkksContext, EncryptedVector, EncryptedVector],
) -> None:
    _, pub, good, other = setup
    r = random.Random(1234)
    outcomes = {"rejected": 0, "accepted": 0}
    for _ in range(100):
        c = bytearray(good.chunks[1])
        for _ in range(r.randint(1, 8)):
            i = r.randrange(16, len(c))
            c[i] ^= 1 << r.randrange(8)
        try:
            _receive(pub, _with_chunk(good.to_wire(), bytes(c)), other)
            outcomes["accepted"] += 1
        except PayloadError as exc:
            assert re.search(r"chunks\[1\]", str(exc)), exc
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0, outcomes


# ----- inner mutations, in a child process ---------------------------------------------

INNER_CASES = 5_000
N = DEFAULT_PARAMS.poly_modulus_degree
ONE_CHUNK = N - 3
ARRAY_AT, DATA_AT = 73, 97  # inner offsets: coefficient array header, first coefficient
SEED_AT = DATA_AT + 8 * N  # PRNG info header of a seeded chunk
INNER_HEADERS = (ARRAY_AT, SEED_AT)
INTERESTING_U64 = (0, 1, 2, 3, 24, 81, 4095, 4096, 4097, 8192, 40_000, 2**32, 2**63, 2**64 - 1)


def _members(chunk: bytes) -> bytearray:
    import zstandard

    return bytearray(zstandard.ZstdDecompressor().decompress(chunk[16:]))


def _pack(chunk: bytes, inner: bytes, *, mode: int = 2, level: int = 1) -> bytes:
    import zstandard

    body = zstandard.ZstdCompressor(level=level).compress(inner) if mode == 2 else inner
    out = bytearray(chunk[:16]) + body
    out[5] = mode
    out[8:16] = len(out).to_bytes(8, "little")
    return bytes(out)


def _raw_frame(inner: bytes) -> bytes:
    """One zstd frame of raw (stored) blocks, by hand (RFC 8878)."""
    out = bytearray(b"\x28\xb5\x2f\xfd\x60") + (len(inner) - 256).to_bytes(2, "little")
    blocks = [inner[i : i + 2**17 - 1] for i in range(0, len(inner), 2**17 - 1)]
    for i, block in enumerate(blocks):
        out += (int(i == len(blocks) - 1) | len(block) << 3).to_bytes(3, "little") + block
    return bytes(out)


def _inner_mutation(r: random.Random, chunk: bytes) -> tuple[str, bytes]:
    """One mutated chunk and the name of its kind; see the module docstring."""
    inner = _members(chunk)
    kind = r.choice(
        [
            "inner_header",
            "known_abort",
            "metadata",
            "count",
            "coefficient",
            "seed",
            "prng_type",
            "bit_flips",
            "resize",
            "splice",
            "uncompressed",
            "raw_frame",
            "zstd_flips",
            "frame_header",
            "trailing",
            "outer_header",
        ]
    )
    if kind == "inner_header":
        at = r.choice(INNER_HEADERS)
        field = r.choice([(0, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (8, 8)])
        off, width = at + field[0], field[1]
        value = r.choice(INTERESTING_U64) if r.random() < 0.5 else r.getrandbits(8 * width)
        inner[off : off + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    elif kind == "known_abort":  # the two payloads of issue 11, with random sizes
        at = r.choice(INNER_HEADERS)
        inner[at + 3], inner[at + 5] = r.choice([(2, 12), (4, 1), (4, 2), (3, 1)])
        inner[at + 8 : at + 16] = r.choice(INTERESTING_U64).to_bytes(8, "little")
    elif kind == "metadata":
        inner[r.randrange(ARRAY_AT)] = r.randrange(256)
    elif kind == "count":
        inner[ARRAY_AT + 16 : DATA_AT] = r.choice(INTERESTING_U64).to_bytes(8, "little")
    elif kind == "coefficient":
        i = DATA_AT + 8 * r.randrange(N)
        q = 2**59  # roughly: a value either side of the prime
        inner[i : i + 8] = r.choice([r.randrange(q), r.randrange(q, 2**64)]).to_bytes(8, "little")
    elif kind == "seed":
        i = SEED_AT + 17 + r.randrange(64)
        inner[i] ^= 1 << r.randrange(8)
    elif kind == "prng_type":
        inner[SEED_AT + 16] = r.randrange(256)
    elif kind == "bit_flips":
        for _ in range(r.randint(1, 8)):
            inner[r.randrange(len(inner))] ^= 1 << r.randrange(8)
    elif kind == "resize":
        cut = r.randrange(len(inner))
        inner = inner[:cut] if r.random() < 0.5 else inner + r.randbytes(r.randint(1, 128))
    elif kind == "splice":
        at = r.randrange(len(inner))
        if r.random() < 0.5:
            del inner[at : at + r.randint(1, 16)]
        else:
            inner[at:at] = r.randbytes(r.randint(1, 16))
    elif kind == "uncompressed":  # the same ciphertext, stored: must be accepted
        return kind, _pack(chunk, bytes(inner), mode=0)
    elif kind == "raw_frame":  # the same ciphertext in a hand-made zstd frame: accepted
        out = bytearray(chunk[:16]) + _raw_frame(bytes(inner))
        out[8:16] = len(out).to_bytes(8, "little")
        return kind, bytes(out)
    packed = bytearray(_pack(chunk, bytes(inner), level=r.choice([1, 3, 9])))
    if kind == "zstd_flips":
        for _ in range(r.randint(1, 4)):
            packed[r.randrange(16, len(packed))] ^= 1 << r.randrange(8)
    elif kind == "frame_header":
        packed[16 + r.randrange(4, 10)] = r.randrange(256)
    elif kind == "trailing":
        packed += r.randbytes(r.randint(1, 64))
        packed[8:16] = len(packed).to_bytes(8, "little")
    elif kind == "outer_header":
        packed[r.randrange(16)] = r.randrange(256)
    return kind, bytes(packed)


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _fuzz_child(cases: int, seed: int) -> dict[str, Any]:
    """Run ``cases`` inner mutations through validate then add; count every outcome."""
    import time

    from fedtune.errors import WirePayloadError
    from fedtune.secure.ckks import CkksCodec

    ctx = make_secret_context(DEFAULT_PARAMS)
    server = CkksCodec(public_context(ctx), length=ONE_CHUNK)
    client = CkksCodec(ctx, length=ONE_CHUNK)
    rng = np.random.default_rng(seed)
    reference = server.validate(client.encode(rng.uniform(-1, 1, ONE_CHUNK)))
    upload = client.encode(rng.uniform(-1, 1, ONE_CHUNK))
    expected_sum = client.decode(reference) + client.decode(upload)
    q = np.array(ctx.primes[: DEFAULT_PARAMS.data_prime_count], dtype=np.uint64)[None, :, None]
    ref: Any = None  # the reference's coefficients, on the first accepted case
    r = random.Random(seed)
    by_kind: dict[str, list[int]] = {}
    escaped: list[str] = []
    wrong: list[str] = []
    worst = 0.0
    rss_before = 0.0
    start = time.perf_counter()
    for case in range(cases):
        if case == min(200, cases // 10):  # after warm-up: caches and arenas are filled
            rss_before = _rss_mib()
        kind, chunk = _inner_mutation(r, upload["chunks"][0])
        counts = by_kind.setdefault(kind, [0, 0])
        t0 = time.perf_counter()
        try:
            payload = server.validate({**upload, "chunks": [chunk]})
            total = server.add([reference, payload])
        except WirePayloadError:
            counts[1] += 1
        except Exception as exc:  # anything else escapes the server's handling
            escaped.append(f"{kind}: {type(exc).__name__}: {exc}")
        else:
            counts[0] += 1
            # Imported here, so that the loop also runs (and dies) on the code before
            # fedtune.crypto.seal_format existed.
            from fedtune.crypto._seal import scratch_dir
            from fedtune.crypto.payload import full_coefficients
            from fedtune.crypto.seal_format import parse_ciphertext

            with scratch_dir() as tmp:
                if ref is None:
                    ref = full_coefficients(ctx, reference["chunks"][0], field="r", directory=tmp)
                want = ref + full_coefficients(ctx, chunk, field="x", directory=tmp)
            want = np.where(want >= q, want - q, want)
            got = parse_ciphertext(total["chunks"][0], ctx.layout, field="t", seeded=False)
            if not np.array_equal(got.data, want):
                wrong.append(f"{kind}: sum coefficients differ")
            if kind in ("uncompressed", "raw_frame") and not np.allclose(
                client.decode(client.validate(total, aggregate=True)), expected_sum, atol=1e-6
            ):
                wrong.append(f"{kind}: an unchanged ciphertext decrypts to other values")
        worst = max(worst, time.perf_counter() - t0)
    return {
        "cases": cases,
        "added": sum(c[0] for c in by_kind.values()),
        "rejected": sum(c[1] for c in by_kind.values()),
        "by_kind": by_kind,
        "escaped": escaped[:10],
        "escaped_count": len(escaped),
        "wrong": wrong[:10],
        "rss_before_mib": rss_before,
        "rss_after_mib": _rss_mib(),
        "worst_case_s": worst,
        "seconds": time.perf_counter() - start,
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
def test_server_path_survives_inner_mutations() -> None:
    run = subprocess.run(
        [sys.executable, __file__, str(INNER_CASES), "11"],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, f"child died (rc {run.returncode}): {run.stderr[-3000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))  # shown with -s: the measured numbers
    assert report["escaped_count"] == 0, report["escaped"]
    assert report["wrong"] == [], report["wrong"]
    assert report["added"] + report["rejected"] == INNER_CASES
    assert report["rss_after_mib"] - report["rss_before_mib"] < 16, report
    assert report["worst_case_s"] < 5, report
    kinds = report["by_kind"]
    assert kinds["uncompressed"][1] == 0 and kinds["raw_frame"][1] == 0, kinds
    for kind in ("inner_header", "known_abort", "metadata", "coefficient", "prng_type"):
        assert kinds[kind][1] > 0, (kind, kinds[kind])


if __name__ == "__main__":
    print(json.dumps(_fuzz_child(int(sys.argv[1]), int(sys.argv[2]))))
