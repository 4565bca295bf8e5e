"""Untrusted ciphertexts never reach SEAL: regression tests of issue 11 and parser unit tests.

The first part replays payloads that crashed or fooled the aggregator before
:mod:`fedtune.crypto.seal_format` existed. All are made from a genuine upload
(or aggregate) by rewriting bytes, without any key. The two that abort the
process (SIGABRT from inside SEAL) run in a child process,
``python tests/test_seal_parse.py CASE``, so that a regression fails one test
instead of killing pytest.

The second part checks each rule of the parser with a specific error.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from fedtune import crypto
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.secure.ckks import CkksCodec

N = crypto.DEFAULT_PARAMS.poly_modulus_degree
LENGTH = N - 3  # one chunk
ARRAY_AT = 73  # the coefficient array's SEALHeader, behind the metadata
DATA_AT = ARRAY_AT + 16 + 8  # its header and count
SEED_AT = DATA_AT + 8 * N  # the PRNG info's SEALHeader, in a seeded chunk (L = 1)


# ----- forging, with nothing but zstd and struct -----------------------------------


def members(chunk: bytes) -> bytearray:
    """The decompressed members of a zstd-compressed chunk."""
    return bytearray(zstandard.ZstdDecompressor().decompress(chunk[16:]))


def rebuild(chunk: bytes, inner: bytes, *, compr_mode: int = 2) -> bytes:
    """``chunk``'s outer header (mode and size fixed) in front of ``inner``, recompressed."""
    body = zstandard.ZstdCompressor(level=1).compress(inner) if compr_mode == 2 else inner
    out = bytearray(chunk[:16]) + body
    out[5] = compr_mode
    struct.pack_into("<Q", out, 8, len(out))
    return bytes(out)


def raw_zstd_frame(*blocks: tuple[str, bytes | int]) -> bytes:
    """A zstd frame of hand-made blocks: ``("raw", data)`` or ``("rle", count)`` zero bytes.

    zstd's format (RFC 8878): magic, a frame header with a 2-byte content size,
    then blocks with a 3-byte header (last flag, type 0 raw / 1 RLE, size).
    """
    sizes = [len(b) if kind == "raw" else b for kind, b in blocks]  # type: ignore[arg-type]
    total = int(sum(sizes))
    out = bytearray(b"\x28\xb5\x2f\xfd\x60") + struct.pack("<H", total - 256)
    for i, (kind, b) in enumerate(blocks):
        size = sizes[i]
        last = int(i == len(blocks) - 1)
        out += (last | (0 if kind == "raw" else 1) << 1 | size << 3).to_bytes(3, "little")
        out += b if kind == "raw" else b"\x00"  # type: ignore[operator]
    return bytes(out)


def seed_header_v2_mode12(upload: bytes) -> bytes:
    """The PRNG info's inner header says SEAL 2.x, compression mode 12 (found by review)."""
    inner = members(upload)
    inner[SEED_AT + 3] = 2
    inner[SEED_AT + 5] = 12
    return rebuild(upload, bytes(inner))


def array_header_zlib_oversize(upload: bytes) -> bytes:
    """The coefficient array's inner header claims zlib and more bytes than follow (fuzzing)."""
    inner = members(upload)
    inner[ARRAY_AT + 5] = 1
    struct.pack_into("<Q", inner, ARRAY_AT + 8, 40_000)
    return rebuild(upload, bytes(inner))


def size_zero(chunk: bytes) -> bytes:
    """A ciphertext of zero polynomials: metadata size 0, an empty array, no seed."""
    genuine = members(chunk)
    meta = genuine[:ARRAY_AT]
    struct.pack_into("<Q", meta, 33, 0)  # parms_id (32 B), ntt (1 B), then size
    array = bytes(genuine[ARRAY_AT : ARRAY_AT + 8]) + struct.pack("<Q", 24)  # header, size 24
    small = rebuild(chunk, bytes(meta) + array + struct.pack("<Q", 0))
    # SEAL skips whatever follows the zstd frame; padding passes the size checks.
    padded = bytearray(small) + np.random.default_rng(3).bytes(31_000 - len(small))
    struct.pack_into("<Q", padded, 8, len(padded))
    return bytes(padded)


def zero_c1(aggregate: bytes, c0: np.ndarray | None = None) -> bytes:
    """A full ciphertext with ``c1 = 0`` (and ``c0`` replaced if given): transparent."""
    inner = members(aggregate)
    if c0 is not None:
        inner[DATA_AT : DATA_AT + 8 * N] = c0.astype("<u8").tobytes()
    inner[DATA_AT + 8 * N : DATA_AT + 16 * N] = bytes(8 * N)
    return rebuild(aggregate, bytes(inner))


def with_chunk(payload: dict[str, Any], chunk: bytes) -> dict[str, Any]:
    return {**payload, "chunks": [chunk]}


# ----- child process: the cases that used to abort ---------------------------------

FORGERIES: dict[str, Callable[[bytes], bytes]] = {
    "seed-header": seed_header_v2_mode12,
    "array-header": array_header_zlib_oversize,
}


def _outcome(step: Callable[[], object]) -> str:
    try:
        step()
    except PayloadError as exc:
        return f"PayloadError: {exc}"
    except Exception as exc:  # reported, and the test fails on it
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def child_main(case: str) -> dict[str, str]:
    """Run one forged payload through the server's or a client's path; name each outcome."""
    path, forgery = case.split(":")
    ctx = crypto.make_secret_context()
    server = CkksCodec(crypto.public_context(ctx), length=LENGTH)
    client = CkksCodec(ctx, length=LENGTH)
    upload = client.encode(np.random.default_rng(0).uniform(-1, 1, LENGTH))
    bad = with_chunk(upload, FORGERIES[forgery](upload["chunks"][0]))
    if path == "server":  # what fedtune/apps/server/strategy.py does with a reply
        return {
            "validate": _outcome(lambda: server.validate(bad)),
            "add": _outcome(lambda: server.add([server.validate(upload), bad])),
        }
    # the same bytes as the global sum: fedtune/train/runtime.py validates, then decodes
    return {
        "validate": _outcome(lambda: client.validate(bad, aggregate=True)),
        "decode": _outcome(lambda: client.decode(bad)),
    }


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
@pytest.mark.parametrize("path", ["server", "client"])
def test_forged_inner_header_does_not_kill_the_process(path: str, forgery: str) -> None:
    run = subprocess.run(
        [sys.executable, __file__, f"{path}:{forgery}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, f"child died (rc {run.returncode}): {run.stderr[-2000:]}"
    outcomes = json.loads(run.stdout.strip().splitlines()[-1])
    for step, outcome in outcomes.items():
        assert re.match(r"PayloadError: `(items\[1\]\.|enc\.)?chunks\[0\]` ", outcome), (
            step,
            outcome,
        )


# ----- in process: payloads that escaped as other errors or moved the sum -----------


@pytest.fixture(scope="module")
def keys() -> tuple[CkksCodec, CkksCodec, dict[str, Any], dict[str, Any]]:
    ctx = crypto.make_secret_context()
    server = CkksCodec(crypto.public_context(ctx), length=LENGTH)
    client = CkksCodec(ctx, length=LENGTH)
    rng = np.random.default_rng(1)
    upload = client.encode(rng.uniform(-1, 1, LENGTH))
    aggregate = server.add([upload, client.encode(rng.uniform(-1, 1, LENGTH))])
    return server, client, upload, aggregate


def test_size_zero_ciphertext_rejected(keys: Any) -> None:
    server, client, upload, aggregate = keys
    for chunk in (upload["chunks"][0], aggregate["chunks"][0]):
        bad = with_chunk(upload, size_zero(chunk))
        with pytest.raises(PayloadError, match=r"`chunks\[0\]` does not decompress: .*unused data"):
            server.validate(bad, aggregate=True)
        with pytest.raises(PayloadError, match=r"`enc\.chunks\[0\]` does not decompress"):
            client.decode(bad)


def test_two_transparent_ciphertexts_rejected_before_add(keys: Any) -> None:
    server, _, upload, aggregate = keys
    bad = with_chunk(upload, zero_c1(aggregate["chunks"][0]))
    for aggregate_mode in (False, True):
        with pytest.raises(PayloadError, match=r"`chunks\[0\]`"):
            server.validate(bad, aggregate=aggregate_mode)
    with pytest.raises(PayloadError, match=r"`items\[0\]\.chunks\[0\]` is transparent"):
        server.add([bad, bad])


def _encoding(ctx: crypto.CkksContext, values: np.ndarray) -> np.ndarray:
    """``c0`` of a transparent ciphertext that decrypts to ``values``: their plain encoding."""
    import tenseal.sealapi as sa

    plain = sa.Plaintext()
    slots = values[0::2] + 1j * values[1::2]
    ctx._encoder.encode(slots.tolist(), ctx.params.scale, plain)
    return np.array([plain.data(i) for i in range(plain.coeff_count())], dtype=np.uint64)


def test_forged_transparent_upload_rejected(keys: Any) -> None:
    """``c1 = 0`` and ``c0`` = an encoding of chosen values, packed to look like an upload."""
    server, client, upload, aggregate = keys
    chosen = np.random.default_rng(2).uniform(100, 200, N)  # random-looking c0: incompressible
    c0 = _encoding(client.context, chosen)
    inner = members(zero_c1(aggregate["chunks"][0], c0))
    # c0 stored raw, the zero c1 as one RLE block: the size of a genuine seeded upload.
    frame = raw_zstd_frame(("raw", bytes(inner[: DATA_AT + 8 * N])), ("rle", 8 * N))
    forged = bytearray(upload["chunks"][0][:16]) + frame
    struct.pack_into("<Q", forged, 8, len(forged))
    bad = with_chunk(upload, bytes(forged))
    lo, hi = crypto.DEFAULT_PARAMS.min_chunk_bytes, crypto.DEFAULT_PARAMS.max_chunk_bytes(polys=1)
    assert lo <= len(forged) <= hi  # it passes every size check an upload gets
    with pytest.raises(
        PayloadError, match=r"`chunks\[0\]` is a zstd frame of 65633 bytes .* at most 32946"
    ):
        server.validate(bad)
    with pytest.raises(PayloadError, match=r"`chunks\[0\]` is transparent: its c1 is zero"):
        client.validate(bad, aggregate=True)
    with pytest.raises(PayloadError, match=r"`items\[1\]\.chunks\[0\]` is transparent"):
        server.add([upload, bad])
    with pytest.raises(PayloadError, match=r"`enc\.chunks\[0\]` is transparent"):
        client.decode(bad)


if __name__ == "__main__":
    print(json.dumps(child_main(sys.argv[1])))


# ----- the parser, rule by rule ------------------------------------------------------


def _set(offset: int, fmt: str, value: object) -> Callable[[bytearray], None]:
    def mutate(inner: bytearray) -> None:
        struct.pack_into(fmt, inner, offset, value)

    return mutate


def _coefficient_above_q(inner: bytearray) -> None:
    struct.pack_into("<Q", inner, DATA_AT + 8 * 5, 2**64 - 1)


#: (seeded chunk?, mutation of the decompressed members, error)
INNER_CASES: dict[str, tuple[bool, Callable[[bytearray], None], str]] = {
    "parms_id": (True, _set(0, "<B", 0), r"metadata \(parms_id, ntt, size, N, L, scale"),
    "ntt": (True, _set(32, "<B", 0), r"metadata .* does not match this context's \(1, 2, 4096"),
    "size": (True, _set(33, "<Q", 3), r"metadata .*\(0?1?, 3, 4096"),
    "N": (True, _set(41, "<Q", 2048), r"metadata .* 2048, 1"),
    "L": (True, _set(49, "<Q", 2), r"metadata .* 4096, 2,"),
    "scale": (True, _set(57, "<d", 2.0**30), r"metadata .* 1073741824\.0"),
    "correction": (True, _set(65, "<Q", 7), r"metadata .*, 7\)"),
    "array_magic": (True, _set(ARRAY_AT, "<H", 0xBEEF), r"no SEAL header at inner offset 73"),
    "array_version": (True, _set(ARRAY_AT + 3, "<B", 2), r"SEAL 2\.3 header at inner offset 73"),
    "array_compr": (True, _set(ARRAY_AT + 5, "<B", 2), r"compression mode 2 at inner offset 73"),
    "array_size": (True, _set(ARRAY_AT + 8, "<Q", 40_000), r"array header declares 40000 bytes"),
    "count": (True, _set(ARRAY_AT + 16, "<Q", 8192), r"stores 8192 coefficients; expected 4096"),
    "coefficient": (True, _coefficient_above_q, r"coefficient 5 of polynomial 0 is \d+, not below"),
    "seed_version": (True, _set(SEED_AT + 3, "<B", 2), r"SEAL 2\.3 header at inner offset 32865"),
    "seed_compr": (True, _set(SEED_AT + 5, "<B", 12), r"compression mode 12 at inner offset 32865"),
    "seed_size": (True, _set(SEED_AT + 8, "<Q", 80), r"PRNG seed header declares 80 bytes"),
    "prng_type": (True, _set(SEED_AT + 16, "<B", 0), r"PRNG type is 0; expected one of"),
    "full_coefficient": (False, _set(DATA_AT + 8 * N + 8, "<Q", 2**60), r"polynomial 1 is \d+"),
    "transparent": (
        False,
        lambda b: b.__setitem__(slice(DATA_AT + 8 * N, None), bytes(8 * N)),
        r"is transparent: its c1 is zero modulo q_0",
    ),
}


@pytest.fixture(scope="module")
def layout(keys: Any) -> Any:
    return keys[0].context.layout


@pytest.mark.parametrize("case", sorted(INNER_CASES))
def test_inner_field_rejected(keys: Any, layout: Any, case: str) -> None:
    from fedtune.crypto.seal_format import parse_ciphertext

    _, _, upload, aggregate = keys
    seeded, mutate, match = INNER_CASES[case]
    chunk = (upload if seeded else aggregate)["chunks"][0]
    inner = members(chunk)
    mutate(inner)
    for mode in (0, 2):  # the same check behind either compression mode
        with pytest.raises(crypto.PayloadError, match=r"^`c` .*" + match):
            parse_ciphertext(rebuild(chunk, bytes(inner), compr_mode=mode), layout, field="c")


def _outer(offset: int, fmt: str, value: object) -> Callable[[bytes], bytes]:
    def mutate(chunk: bytes) -> bytes:
        out = bytearray(chunk)
        struct.pack_into(fmt, out, offset, value)
        return bytes(out)

    return mutate


def _with_dictionary_id(chunk: bytes) -> bytes:
    inner = members(chunk)
    frame = bytearray(raw_zstd_frame(("raw", bytes(inner))))
    frame[4] |= 1  # Dictionary_ID_flag: one byte of dictionary id after the descriptor
    frame[5:5] = b"\x07"
    out = bytearray(chunk[:16]) + frame
    struct.pack_into("<Q", out, 8, len(out))
    return bytes(out)


def _bomb(chunk: bytes) -> bytes:
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(10 * 2**20))
    out = bytearray(chunk[:16]) + frame
    struct.pack_into("<Q", out, 8, len(out))
    return bytes(out)


def _bomb_unknown_size(chunk: bytes) -> bytes:
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(2**20))
    out = bytearray(chunk[:16]) + frame
    struct.pack_into("<Q", out, 8, len(out))
    return bytes(out)


def _trailing(chunk: bytes) -> bytes:
    out = bytearray(chunk) + b"\x00" * 8
    struct.pack_into("<Q", out, 8, len(out))
    return bytes(out)


OUTER_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "short": (lambda c: c[:10], r"is 10 bytes, shorter than a SEAL header"),
    "magic": (_outer(0, "<H", 0x1234), r"has no SEAL header \(magic=0x1234"),
    "header_size": (_outer(2, "<B", 8), r"has no SEAL header .*header_size=8"),
    "version": (_outer(3, "<B", 9), r"has a SEAL 9\.3 header; this build reads and writes 4\.3"),
    "zlib": (_outer(5, "<B", 1), r"has compression mode 1; accepted: 0 \(none\), 2 \(zstd\)"),
    "reserved": (_outer(6, "<H", 1), r"has no SEAL header .*reserved=1"),
    "size": (_outer(8, "<Q", 12), r"declares 12 bytes in its SEAL header but has"),
    "not_zstd": (
        lambda c: c[:16] + bytes(len(c) - 16),
        r"declares zstd but its body is not a zstd",
    ),
    "dictionary": (_with_dictionary_id, r"is a zstd frame with a dictionary \(7\)"),
    "bomb": (_bomb, r"is a zstd frame of 10485760 bytes .* at most 65633"),
    "bomb_unknown_size": (_bomb_unknown_size, r"does not decompress"),
    "trailing": (_trailing, r"does not decompress: .*8 bytes of unused data"),
    "truncated_frame": (lambda c: _outer(8, "<Q", len(c) - 1)(c[:-1]), r"does not decompress"),
}


@pytest.mark.parametrize("case", sorted(OUTER_CASES))
def test_outer_layer_rejected(keys: Any, layout: Any, case: str) -> None:
    from fedtune.crypto.seal_format import parse_ciphertext

    mutate, match = OUTER_CASES[case]
    with pytest.raises(crypto.PayloadError, match=r"^`c` " + match):
        parse_ciphertext(mutate(keys[3]["chunks"][0]), layout, field="c")


def test_kind_and_type_rejected(keys: Any, layout: Any) -> None:
    from fedtune.crypto.seal_format import parse_ciphertext

    upload, aggregate = keys[2]["chunks"][0], keys[3]["chunks"][0]
    with pytest.raises(crypto.PayloadError, match=r"holds 32946 bytes .* expected 65633 \(full\)"):
        parse_ciphertext(upload, layout, field="c", seeded=False)
    with pytest.raises(crypto.PayloadError, match=r"zstd frame of 65633 bytes .* at most 32946"):
        parse_ciphertext(aggregate, layout, field="c", seeded=True)
    with pytest.raises(crypto.PayloadError, match=r"`c` should be bytes, got bytearray"):
        parse_ciphertext(bytearray(upload), layout, field="c")  # type: ignore[arg-type]


def test_rebuilt_bytes_equal_what_seal_wrote(keys: Any, layout: Any) -> None:
    """The rebuild is SEAL's own serialisation, field for field (uncompressed)."""
    from fedtune.crypto.seal_format import parse_ciphertext, serialize

    for chunk in (keys[2]["chunks"][0], keys[3]["chunks"][0]):
        parsed = parse_ciphertext(chunk, layout, field="c")
        rebuilt = serialize(layout, parsed, compress=False)
        assert rebuilt[16:] == bytes(members(chunk))
        assert rebuilt[:16] == rebuild(chunk, bytes(members(chunk)), compr_mode=0)[:16]
        again = parse_ciphertext(serialize(layout, parsed, compress=True), layout, field="c")
        assert np.array_equal(again.data, parsed.data) and again.prng_info == parsed.prng_info


# ----- add cannot fail on validated payloads ------------------------------------------


def test_numpy_sum_equals_seal_evaluator(keys: Any) -> None:
    """``sum_encrypted`` adds coefficients mod q exactly as SEAL's ``Evaluator.add`` does."""
    from fedtune.crypto._seal import scratch_dir, seal_dump
    from fedtune.crypto.payload import load_ciphertext
    from fedtune.crypto.seal_format import parse_ciphertext

    server, client, upload, _ = keys
    ctx = server.context
    rng = np.random.default_rng(4)
    ups = [upload] + [client.encode(rng.uniform(-9, 9, LENGTH)) for _ in range(4)]
    ours = parse_ciphertext(server.add(ups)["chunks"][0], ctx.layout, field="c", seeded=False)
    with scratch_dir() as tmp:
        acc = load_ciphertext(ctx, ups[0]["chunks"][0], field="u0", directory=tmp)
        for k, up in enumerate(ups[1:]):
            ct = load_ciphertext(ctx, up["chunks"][0], field=f"u{k}", directory=tmp)
            ctx._evaluator.add_inplace(acc, ct)
        theirs = parse_ciphertext(seal_dump(acc.save, tmp), ctx.layout, field="s", seeded=False)
    assert np.array_equal(ours.data, theirs.data)


def test_add_of_validated_payloads_cannot_fail(keys: Any) -> None:
    """Even when the sum is transparent (SEAL's add throws there), add returns; receivers refuse."""
    server, client, _, aggregate = keys
    rng = np.random.default_rng(5)
    q = server.context.layout.primes[0]
    inner = members(aggregate["chunks"][0])
    c1 = np.frombuffer(bytes(inner[DATA_AT + 8 * N : DATA_AT + 16 * N]), dtype="<u8")
    inner[DATA_AT : DATA_AT + 8 * N] = rng.integers(0, q, N, dtype=np.uint64).tobytes()
    inner[DATA_AT + 8 * N : DATA_AT + 16 * N] = ((q - c1) % q).astype("<u8").tobytes()
    cancel = with_chunk(aggregate, rebuild(aggregate["chunks"][0], bytes(inner)))
    payloads = [server.validate(p, aggregate=True) for p in (aggregate, cancel)]
    total = server.add(payloads)  # SEAL: "result ciphertext is transparent"
    with pytest.raises(PayloadError, match=r"`chunks\[0\]` is transparent"):
        client.validate(total, aggregate=True)
    # Extremes that pass validate: K uploads at +-max_abs_value / K add and decrypt.
    peak = crypto.DEFAULT_PARAMS.max_abs_value
    for k in (1, 2, 7):
        vectors = [rng.choice([-1.0, 1.0], LENGTH) * peak / k for _ in range(k)]
        ups = [server.validate(client.encode(v)) for v in vectors]
        got = client.decode(client.validate(server.add(ups), aggregate=True))
        assert np.abs(got - np.sum(vectors, axis=0)).max() < 1e-3
