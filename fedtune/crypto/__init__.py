"""CKKS homomorphic encryption for federated averaging.

Clients share one secret key; the server holds a context without it and only
adds ciphertexts. Client ``k`` uploads ``Enc(n_k * w_k)``; key holders decrypt
the sum and divide by ``sum_k n_k`` to get the FedAvg weighted mean.

Public API
----------
``CkksParams(*, poly_modulus_degree, coeff_mod_bit_sizes, global_scale_bits)``
    Frozen, validated parameters; ``DEFAULT_PARAMS`` below.
``make_secret_context(params=DEFAULT_PARAMS) -> CkksContext``
``public_context(ctx) -> CkksContext``                 same context, no secret key
``has_secret_key(ctx) -> bool``, ``fingerprint(ctx) -> str``
``save_keys(ctx, out_dir) -> KeyFiles``                secret.ctx (0600), public.ctx, fingerprint.txt
``load_context(path) -> CkksContext``; ``context_to_bytes`` / ``context_from_bytes``
``encrypt_vector(ctx, vector, *, scale=1.0) -> EncryptedVector``
``sum_encrypted(public_ctx, items) -> EncryptedVector``
``decrypt_vector(secret_ctx, enc) -> np.ndarray``      float64, ``enc.length`` values
``EncryptedVector(chunks: list[bytes], length: int, fingerprint: str)``
    with ``to_wire() -> dict`` (plain types for a Flower ConfigRecord) and ``from_wire``.
``validate_wire(payload, *, params, expected_fingerprint, expected_length,
max_chunk_bytes=None) -> EncryptedVector``
    checks an untrusted payload before anything is deserialised.
``CryptoError`` (e.g. no secret key) and ``PayloadError(CryptoError, ValueError)``.

Design, chosen by measurement (``python benchmarks/bench_crypto.py``, 2-core CPU)
-------------------------------------------------------------------------------
* Depth 0, so a single 60-bit prime: no relinearisation or Galois keys.
* Symmetric (secret-key) encryption: every encrypting party holds the key
  anyway; its noise is lower than public-key encryption and SEAL serialises
  it *seeded* (the random half of the ciphertext replaced by a 64-byte seed).
* Two parameters per complex slot (real and imaginary part).
* TenSEAL's high-level ``ts.ckks_vector`` cannot do any of the three (it
  refuses a single prime, encodes reals only, never seeds): 32.4 B/param
  measured for both public-key and symmetric contexts. We therefore use
  SEAL through ``tenseal.sealapi`` (see ``_seal.py``).

``DEFAULT_PARAMS = CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60,),
global_scale_bits=34)``: N=4096 allows 109 bits at 128-bit security, we use 60.
Candidates (upload / aggregate bytes per parameter at 150k parameters; usable
range; worst error of the weighted mean for one client with n=1 and for 100
clients with n up to 1e5; requirement: range >= 1e7, error <= 1e-7):

=========================  ======  =========  =======  ========  =========
params                     upload  aggregate  range    err n=1   err K=100
=========================  ======  =========  =======  ========  =========
N=2048 q=54  scale=2^29    7.69    15.25      8.4e6    7.4e-7    1.5e-12
N=4096 q=56  scale=2^30    7.68    15.29      1.7e7    5.5e-7    1.1e-12
N=4096 q=58  scale=2^32    7.89    15.71      1.7e7    1.3e-7    2.9e-13
N=4096 q=60  scale=2^34    8.13    16.20      1.7e7    3.4e-8    6.8e-14   <- chosen
N=8192 q=60  scale=2^34    8.33    16.62      1.7e7    4.5e-8    1.0e-13
=========================  ======  =========  =======  ========  =========

With the default: a client upload costs 8.1 B/param (seeded), the aggregate
16.2 B/param (a sum is no longer seeded); 150k parameters encrypt at about
2.4M params/s, add at 4.8M params/s per input and decrypt at 3.8M params/s;
the decrypted mean matches numpy within 1e-12 for realistic counts and within
3.4e-8 in the worst corner (a single client with n=1). The aggregate must
stay within ``max_abs_value`` = 2**24 (about 1.7e7) in absolute value.

Untrusted input and isolation: see :mod:`fedtune.crypto.payload`. Fuzzing
SEAL's loader (12,000 mutations, no pre-checks) never crashed or hung, so
payloads are deserialised in-process after type, fingerprint, count, size and
SEAL-header checks; every failure is a ``PayloadError``.
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
from fedtune.crypto.errors import CryptoError, PayloadError
from fedtune.crypto.packing import decrypt_vector, encrypt_vector, sum_encrypted
from fedtune.crypto.params import DEFAULT_PARAMS, MAX_COEFF_MODULUS_BITS_128, CkksParams
from fedtune.crypto.payload import EncryptedVector, validate_wire

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
    "validate_wire",
]
