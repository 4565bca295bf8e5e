"""CKKS homomorphic encryption for federated averaging.

Clients share one secret key; the server holds a context without it and only
adds ciphertexts. Client ``k`` uploads ``Enc(n_k * w_k)``; key holders decrypt
the sum and divide by ``sum_k n_k`` to get the FedAvg weighted mean.

Public API
----------
``CkksParams(*, poly_modulus_degree, coeff_mod_bit_sizes, global_scale_bits)``
    Frozen, validated parameters; ``DEFAULT_PARAMS`` below. Derived sizes, the
    usable range ``max_abs_value`` and the error's ``fresh_noise_std``.
``make_secret_context(params=DEFAULT_PARAMS) -> CkksContext``
``public_context(ctx) -> CkksContext``                 same context, no secret key
``has_secret_key(ctx) -> bool``, ``fingerprint(ctx) -> str``
``save_keys(ctx, out_dir) -> KeyFiles``
    writes secret.ctx (0600), public.ctx, fingerprint.txt.
``load_context(path) -> CkksContext``; ``context_to_bytes`` / ``context_from_bytes``
``encrypt_vector(ctx, vector, *, scale=1.0) -> EncryptedVector``
``sum_encrypted(public_ctx, items) -> EncryptedVector``
``decrypt_vector(secret_ctx, enc) -> np.ndarray``      float64, ``enc.length`` values
``EncryptedVector(chunks: list[bytes], length: int, fingerprint: str)``
    with ``to_wire() -> dict`` (plain types for a Flower ConfigRecord) and ``from_wire``.
``validate_encrypted(ctx, payload, *, length, aggregate=False) -> EncryptedVector``
    checks an untrusted payload completely (what the codecs call).
``validate_wire(payload, *, params, expected_fingerprint, expected_length,
max_chunk_bytes=None) -> EncryptedVector``
    its first, shallow part: types, fingerprint, count, sizes, outer header.
``CryptoError`` (e.g. no secret key) and ``PayloadError(CryptoError, ValueError)``.

Design, chosen by measurement (``python benchmarks/bench_crypto.py``, 2-core CPU)
--------------------------------------------------------------------------------
* Depth 0, so a single prime: no relinearisation or Galois keys.
* Symmetric (secret-key) encryption: every encrypting party holds the key
  anyway; its noise is lower than public-key encryption and SEAL serialises
  it *seeded* (the random half of the ciphertext replaced by a 64-byte seed).
* Two parameters per complex slot (real and imaginary part).
* TenSEAL's high-level ``ts.ckks_vector`` cannot do any of the three (it
  refuses a single prime, encodes reals only, never seeds): 32.5 B/param
  measured for both public-key and symmetric contexts. We therefore use
  SEAL through ``tenseal.sealapi`` (see ``_seal.py``).

``DEFAULT_PARAMS = CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(59,),
global_scale_bits=33)``: N=4096 allows 109 bits at 128-bit security, we use 59.
Requirements: at most 16 B/param for the upload *and* the aggregate; usable
range >= 1e7 (100 clients x 1e5 examples x ``|w| <= 1``); the weighted mean
within 2e-7 of numpy, 5x under the project's 1e-6, with a factor 2 of
headroom on the worst error measured. Candidates (bytes per parameter at the
default model's 76,808 adapter parameters; range; standard deviation of the
error of one fresh ciphertext, :attr:`CkksParams.fresh_noise_std`, which
measurement matches to three digits; worst error of the weighted mean for one
client with n=1 over 2**20 values and for 100 clients with n up to 1e5):

=========================  ======  =========  =======  =======  ========  =========
params                     upload  aggregate  range    sd       err n=1   err K=100
=========================  ======  =========  =======  =======  ========  =========
N=2048 q=54  scale=2^29    7.71    15.29      8.4e6    1.9e-7   9.9e-7    1.5e-12
N=4096 q=56  scale=2^30    7.70    15.34      1.7e7    1.4e-7   6.7e-7    1.2e-12
N=4096 q=58  scale=2^32    7.91    15.76      1.7e7    3.4e-8   1.6e-7    2.7e-13
N=4096 q=59  scale=2^33    8.00    15.93      1.7e7    1.7e-8   8.8e-8    1.5e-13  <- chosen
N=4096 q=60  scale=2^34    8.16    16.24      1.7e7    8.6e-9   4.3e-8    6.4e-14
N=8192 q=60  scale=2^34    8.56    17.08      1.7e7    1.2e-8   5.7e-8    8.8e-14
=========================  ======  =========  =======  =======  ========  =========

q=60 misses the byte budget on the aggregate. q=58 meets 2e-7 without
headroom: its worst error was 1.84e-7 over 2**24 values (16 keys), and 2e-7 is
only 5.8 standard deviations, exceeded about once per 2e8 values. At q=59,
2e-7 is 11.7 standard deviations (worst seen over 2**24 values: 8.8e-8).

With the default: a client upload costs 8.0 B/param (seeded), the aggregate
15.9 B/param (a sum is not seeded); 1M parameters take 7.9 / 15.8
B/param. Every started chunk of 4096 values costs a whole ciphertext (about
32.2 kB up, 64.4 kB down), so the aggregate stays under 16 B/param only while
the padding of the last chunk is under 1.7% of the vector (76,808 values: 1.3%;
an adapter with a 3-label head, 74,883 values: 3.9%, 16.3 B/param). 77k
parameters encrypt at about 2.4M params/s, add at 6.5M params/s per input
and decrypt at 4.9M params/s (2-core CPU, before the Python parsing below;
with it, on the same machine under a load of 12, adding four 77k uploads took
430 ms against 156 ms before, validating one 30 ms); the decrypted mean matches numpy
within 1e-12 for realistic counts and within 2e-7 in the worst corner (a
single client with n=1). The aggregate must stay within ``max_abs_value`` =
2**24 (about 1.7e7) in absolute value.

Untrusted input: see :mod:`fedtune.crypto.payload` and
:mod:`fedtune.crypto.seal_format`. SEAL never sees a byte from the network:
every chunk is decompressed (bounded) and checked field by field in Python,
transparent ciphertexts (``c1 = 0``) are refused, and SEAL loads only a
serialisation rebuilt from the checked numbers. Handing SEAL the client's
bytes directly let one upload abort the server (SIGABRT inside SEAL's
loader, two payloads known, ``tests/test_seal_parse.py``); every failure is
now a ``PayloadError``, and :func:`sum_encrypted` (numpy) cannot fail on
payloads that passed :func:`validate_encrypted`. Context files are parsed the
same way: the secret key in ``secret.ctx`` byte for byte
(:mod:`fedtune.crypto.key_format`), and a server's ``public.ctx`` may hold no key
bytes at all (``load_context(path, public=True)``).

Verified sums: :mod:`fedtune.crypto.receipts` (upload tags keyed from the secret
key, and the ``c1`` equation a key holder checks before decrypting a sum; the
protocol around it is :mod:`fedtune.secure.verify`).
"""

from fedtune.crypto.context import (
    CkksContext,
    KeyFiles,
    context_from_bytes,
    context_to_bytes,
    fingerprint,
    has_secret_key,
    load_context,
    make_secret_context,
    public_context,
    save_keys,
)
from fedtune.crypto.packing import decrypt_vector, encrypt_vector, sum_encrypted
from fedtune.crypto.params import DEFAULT_PARAMS, MAX_COEFF_MODULUS_BITS_128, CkksParams
from fedtune.crypto.payload import EncryptedVector, validate_encrypted, validate_wire
from fedtune.errors import CryptoError, PayloadError

__all__ = [
    "DEFAULT_PARAMS",
    "MAX_COEFF_MODULUS_BITS_128",
    "CkksContext",
    "CkksParams",
    "CryptoError",
    "EncryptedVector",
    "KeyFiles",
    "PayloadError",
    "context_from_bytes",
    "context_to_bytes",
    "decrypt_vector",
    "encrypt_vector",
    "fingerprint",
    "has_secret_key",
    "load_context",
    "make_secret_context",
    "public_context",
    "save_keys",
    "sum_encrypted",
    "validate_encrypted",
    "validate_wire",
]
