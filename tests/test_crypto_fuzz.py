"""Survival of the aggregator under corrupted payloads.

Every payload goes through ``validate_wire`` then ``sum_encrypted`` in *this*
process: a crash in SEAL's C++ would take pytest down with it, which is the
point. Corruptions that must be detected assert ``PayloadError``; bit flips
inside the compressed body can yield a well-formed encryption of other
values, which no aggregator can detect, so those only have to not crash.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
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
