"""Authenticated uploads and the ``c1`` equation: what a key holder checks before decrypting.

Why: the server adds ciphertexts it cannot read, so it cannot tell a genuine
upload from one made under another key, nor can a key holder tell a genuine sum
from a forgery by looking at the ciphertext (issue 27). Two facts make a sum
checkable with nothing but the secret key and a few bytes per upload:

1. **Tags.** Every upload carries ``tag = HMAC-SHA256(K, run, round, name, n_k,
   seeds, SHA-256(upload))`` with ``K = HMAC-SHA256("fedtune/upload-tag/v1",
   secret key bytes)`` (HKDF-Extract, RFC 5869 section 2.2, with the domain string
   as salt). Only key holders can make or check one; it binds the upload to its
   node's name, the run and the round, so an old upload, another node's, or one
   made without the key does not verify.
2. **Seeded** ``c1``. A fresh upload stores its random polynomial ``c1`` as a
   64-byte seed (SEAL's ``encrypt_symmetric``), expanded by a CSPRNG. Ciphertexts
   add coefficient-wise, so the sum of uploads ``k`` has
   ``c1 = sum_k Expand(seed_k) mod q``. A key holder recomputes that from the
   seeds the server lists and compares it with the global's ``c1``, exactly.
   That rules out a *near-transparent* forgery (``c1`` the constant polynomial
   1: it decrypts to ``c0 + s``, and a ternary ``s`` is small, so ``c0`` decodes
   to values the forger chose, within 1.7e-11), a single upload resent as "the
   sum" of several (its ``c1`` is one expansion, not the sum), and any ``c1``
   made without the listed seeds. Seeds are 64 bytes from SEAL's CSPRNG; finding
   other seeds whose expansions sum to a chosen ``c1`` means inverting it.

What the equation does not pin is ``c0``: a server can add a public offset
``delta`` to ``c0`` and the key holder decrypts the true sum plus ``delta``. That
moves the model (the bound checks of :mod:`fedtune.bounds` limit it), it does
not isolate any upload: ``c0 - sum_k c0_k`` would have to cancel ``c1 s`` terms
of the uploads left out, which needs the key.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np
from numpy.typing import NDArray

from fedtune.crypto._seal import scratch_dir, seal_dump
from fedtune.crypto.context import CkksContext
from fedtune.crypto.payload import EncryptedVector, full_coefficients, to_seal
from fedtune.crypto.seal_format import ParsedCiphertext, parse_ciphertext
from fedtune.errors import PayloadError

__all__ = [
    "SEED_BYTES",
    "TAG_BYTES",
    "c1_matches",
    "tag_key",
    "upload_digest",
    "upload_seeds",
    "upload_tag",
]

#: Bytes per chunk in a seed list: SEAL's PRNG type byte and its 64-byte seed.
SEED_BYTES = 65
TAG_BYTES = 32
_TAG_DOMAIN = b"fedtune/upload-tag/v1"


def tag_key(ctx: CkksContext) -> bytes:
    """``K`` of this module's docstring; only a key holder has it."""
    ctx.require_secret_key("make or check upload tags")
    return hmac.new(_TAG_DOMAIN, ctx._secret_key_bytes or b"", hashlib.sha256).digest()


def upload_digest(enc: EncryptedVector) -> bytes:
    """SHA-256 over the upload's chunks, each prefixed by its length (unambiguous)."""
    h = hashlib.sha256(b"fedtune/upload/v1\x00")
    h.update(struct.pack("<QQ", enc.length, len(enc.chunks)))
    for chunk in enc.chunks:
        h.update(struct.pack("<Q", len(chunk)))
        h.update(chunk)
    return h.digest()


def upload_seeds(ctx: CkksContext, enc: EncryptedVector) -> bytes:
    """The seeds of a fresh upload, :data:`SEED_BYTES` per chunk, concatenated.

    Raises
    ------
    PayloadError
        If a chunk does not parse or is not seeded (a sum is not an upload).
    """
    out = []
    for i, chunk in enumerate(enc.chunks):
        parsed = parse_ciphertext(chunk, ctx.layout, field=f"chunks[{i}]", seeded=True)
        out.append(parsed.prng_info or b"")
    return b"".join(out)


def upload_tag(
    key: bytes,
    *,
    run: str,
    server_round: int,
    name: str,
    num_examples: int,
    seeds: bytes,
    digest: bytes,
) -> bytes:
    """The tag of one upload (this module's docstring, point 1); ``key`` from :func:`tag_key`."""
    fields = [run.encode(), str(server_round).encode(), name.encode(), str(num_examples).encode()]
    msg = b"".join(struct.pack("<Q", len(f)) + f for f in fields)
    msg += struct.pack("<Q", len(seeds)) + seeds + digest
    return hmac.new(key, msg, hashlib.sha256).digest()


def _expand(ctx: CkksContext, prng_info: bytes, directory: str) -> NDArray[np.uint64]:
    """``c1`` of a seeded ciphertext with this seed (``c0`` does not enter the expansion)."""
    n, lvl = ctx.layout.poly_modulus_degree, len(ctx.layout.primes)
    if len(prng_info) != SEED_BYTES or prng_info[0] not in (1, 2):
        raise PayloadError(
            f"a listed seed is {len(prng_info)} bytes of PRNG type {prng_info[:1].hex()}; "
            f"expected {SEED_BYTES} bytes of type 01 or 02."
        )
    parsed = ParsedCiphertext(np.zeros((1, lvl, n), dtype=np.uint64), prng_info)
    sealed = to_seal(ctx, parsed, field="seed", directory=directory)
    full = parse_ciphertext(seal_dump(sealed.save, directory), ctx.layout, field="seed")
    return full.data[1]


def c1_matches(ctx: CkksContext, enc: EncryptedVector, seed_lists: list[bytes]) -> bool:
    """Whether every chunk of ``enc`` has ``c1 = sum_k Expand(seed_k)``, exactly.

    Parameters
    ----------
    ctx : CkksContext
        Public or secret context (no key is needed for this part).
    enc : EncryptedVector
        The global sum, already validated.
    seed_lists : list[bytes]
        Per listed upload, :data:`SEED_BYTES` per chunk (:func:`upload_seeds`).

    Raises
    ------
    PayloadError
        If a seed list has the wrong size or a seed does not expand.
    """
    chunks = len(enc.chunks)
    for k, seeds in enumerate(seed_lists):
        if len(seeds) != SEED_BYTES * chunks:
            raise PayloadError(
                f"upload {k} lists {len(seeds)} seed bytes; {chunks} chunks need "
                f"{SEED_BYTES * chunks}."
            )
    primes = np.array(ctx.layout.primes, dtype=np.uint64)[:, None]
    with scratch_dir() as tmp:
        for i, chunk in enumerate(enc.chunks):
            acc = np.zeros((len(ctx.layout.primes), ctx.layout.poly_modulus_degree), np.uint64)
            for seeds in seed_lists:
                acc += _expand(ctx, seeds[i * SEED_BYTES : (i + 1) * SEED_BYTES], tmp)
                np.subtract(acc, primes, out=acc, where=acc >= primes)
            c1 = full_coefficients(ctx, chunk, field=f"chunks[{i}]", directory=tmp)[1]
            if not np.array_equal(acc, c1):
                return False
    return True
