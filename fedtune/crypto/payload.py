"""The wire format of encrypted vectors, and validation of untrusted payloads.

Everything that arrives over the network is checked here, in this order,
before a single byte reaches C++:

1. types (a dict with exactly ``chunks: list[bytes]``, ``length: int``,
   ``fingerprint: str``);
2. the context fingerprint, then the length, then the number of chunks
   (``ceil(length / N)``);
3. each chunk's size, between the entropy floor of one polynomial and the
   uncompressed size of a ciphertext (:meth:`CkksParams.max_chunk_bytes`);
4. each chunk's 16-byte SEAL header: magic, version, compression mode, and a
   declared size equal to the actual size.

Only then does :func:`load_ciphertext` hand the bytes to SEAL, whose loader
validates the metadata against the context and every coefficient against
its prime, and throws (a Python exception, never a crash) otherwise. Finally
the loaded ciphertext must have two polynomials, our parameters and our scale.

Isolation finding (``tests/test_crypto_fuzz.py``, and 12,000 extra mutations
during development fed to SEAL 4.3's loader *without* our pre-checks, in a
child process): bit flips, header rewrites, truncation, random bodies behind
valid headers, random bytes and appended garbage never crashed or hung the
process; every failure was a ``RuntimeError``/``ValueError``. Deserialising
in-process behind the checks above is therefore safe and costs nothing, so
no subprocess isolation is used (a subprocess per reply would add tens of
milliseconds and a pickling copy of every ciphertext).

A chunk that passes every check can still be a well-formed encryption of
garbage: integrity of a client's update is TLS's and DP's business, not the
aggregator's (it cannot read the values by design).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.crypto._seal import parse_header, seal_load, sealapi
from fedtune.crypto.context import CkksContext
from fedtune.crypto.errors import PayloadError
from fedtune.crypto.params import CkksParams

__all__ = ["EncryptedVector", "load_ciphertext", "validate_wire"]

_WIRE_KEYS = frozenset({"chunks", "length", "fingerprint"})


@dataclass(frozen=True)
class EncryptedVector:
    """A real vector encrypted as ``ceil(length / N)`` serialised CKKS ciphertexts.

    Attributes
    ----------
    chunks : list[bytes]
        SEAL-serialised ciphertexts; chunk ``i`` holds values
        ``[i * N, (i + 1) * N)``, two per complex slot.
    length : int
        Number of real values (the padding of the last chunk is dropped).
    fingerprint : str
        :attr:`CkksContext.fingerprint` of the key generation used.
    """

    chunks: list[bytes]
    length: int
    fingerprint: str

    @property
    def nbytes(self) -> int:
        """Total size of the ciphertexts on the wire."""
        return sum(len(c) for c in self.chunks)

    def to_wire(self) -> dict[str, Any]:
        """Plain types only (``list[bytes]``, ``int``, ``str``), e.g. for a ``ConfigRecord``."""
        return {
            "chunks": list(self.chunks),
            "length": self.length,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_wire(cls, payload: object) -> EncryptedVector:
        """Rebuild from :meth:`to_wire` output, checking types only.

        Use :func:`validate_wire` for anything that came over the network.
        """
        if not isinstance(payload, Mapping):
            raise PayloadError(f"payload should be a mapping, got {type(payload).__name__}.")
        keys = set(payload)
        if keys != _WIRE_KEYS:
            raise PayloadError(
                f"payload keys should be {sorted(_WIRE_KEYS)}, got {sorted(map(str, keys))}."
            )
        chunks, length, fp = (
            payload["chunks"],
            payload["length"],
            payload["fingerprint"],
        )
        if not isinstance(chunks, list | tuple):
            raise PayloadError(f"`chunks` should be a list of bytes, got {type(chunks).__name__}.")
        for i, chunk in enumerate(chunks):
            if not isinstance(chunk, bytes):
                raise PayloadError(f"`chunks[{i}]` should be bytes, got {type(chunk).__name__}.")
        if isinstance(length, bool) or not isinstance(length, int):
            raise PayloadError(f"`length` should be an int, got {type(length).__name__}.")
        if not isinstance(fp, str):
            raise PayloadError(f"`fingerprint` should be a str, got {type(fp).__name__}.")
        return cls(chunks=list(chunks), length=length, fingerprint=fp)


def validate_wire(
    payload: object,
    *,
    params: CkksParams,
    expected_fingerprint: str,
    expected_length: int,
    max_chunk_bytes: int | None = None,
) -> EncryptedVector:
    """Check an untrusted payload completely, without deserialising it.

    Parameters
    ----------
    payload : object
        What :meth:`EncryptedVector.to_wire` produced on the other side, or
        anything else: untrusted input is type-checked first.
    params : CkksParams
        Parameters of the receiving context.
    expected_fingerprint : str
        Fingerprint of the receiving context.
    expected_length : int
        Number of values the vector must carry (the adapter size).
    max_chunk_bytes : int or None
        Largest acceptable chunk. ``None`` means a fresh client upload
        (seeded, one polynomial): ``params.max_chunk_bytes(polys=1)``. Pass
        ``params.max_chunk_bytes(polys=2)`` for an aggregate from the server.

    Returns
    -------
    EncryptedVector
        The same data, typed.

    Raises
    ------
    PayloadError
        Naming the field and the value that failed.
    """
    enc = EncryptedVector.from_wire(payload)
    if enc.fingerprint != expected_fingerprint:
        raise PayloadError(
            f"`fingerprint` {enc.fingerprint[:80]!r} does not match this federation's "
            f"CKKS context {expected_fingerprint!r}: encrypted under another key."
        )
    if enc.length != expected_length:
        raise PayloadError(f"`length` should be {expected_length}, got {enc.length}.")
    n_expected = params.chunk_count(expected_length)
    if len(enc.chunks) != n_expected:
        raise PayloadError(
            f"`chunks` should hold {n_expected} ciphertexts for length {expected_length}, "
            f"got {len(enc.chunks)}."
        )
    upper = params.max_chunk_bytes(polys=1) if max_chunk_bytes is None else max_chunk_bytes
    lower = params.min_chunk_bytes
    for i, chunk in enumerate(enc.chunks):
        if not lower <= len(chunk) <= upper:
            raise PayloadError(
                f"`chunks[{i}]` is {len(chunk)} bytes; a ciphertext for these parameters "
                f"takes between {lower} and {upper}."
            )
        parse_header(chunk, field=f"chunks[{i}]")
    return enc


def load_ciphertext(ctx: CkksContext, data: bytes, *, field: str, directory: str) -> Any:
    """Deserialise one ciphertext and check it fits ``ctx`` exactly.

    Parameters
    ----------
    ctx : CkksContext
        Public or secret context.
    data : bytes
        A serialised ciphertext (already size-checked by :func:`validate_wire`).
    field : str
        Name for error messages, e.g. ``"items[3].chunks[7]"``.
    directory : str
        Scratch directory from :func:`fedtune.crypto._seal.scratch_dir`.

    Raises
    ------
    PayloadError
        If SEAL refuses the bytes or the ciphertext does not match ``ctx``.
    """
    parse_header(data, field=field)
    sa = sealapi()
    ct = sa.Ciphertext()
    try:
        seal_load(lambda p: ct.load(ctx._seal_context, p), data, directory)
    except (RuntimeError, ValueError) as exc:
        raise PayloadError(f"`{field}` is not a valid ciphertext for this context: {exc}.") from exc
    p = ctx.params
    first = ctx._seal_context.first_parms_id()
    if list(ct.parms_id()) != list(first):
        raise PayloadError(f"`{field}` is at another level of the modulus chain than this context.")
    if ct.size() != 2:
        raise PayloadError(
            f"`{field}` has {ct.size()} polynomials; a fresh or summed ciphertext has 2."
        )
    if (ct.poly_modulus_degree(), ct.coeff_modulus_size()) != (
        p.poly_modulus_degree,
        p.data_prime_count,
    ):
        raise PayloadError(
            f"`{field}` has N={ct.poly_modulus_degree()}, L={ct.coeff_modulus_size()}; "
            f"expected N={p.poly_modulus_degree}, L={p.data_prime_count}."
        )
    if not ct.is_ntt_form():
        raise PayloadError(f"`{field}` is not in NTT form, as CKKS ciphertexts are.")
    if ct.scale != p.scale:
        raise PayloadError(f"`{field}` has scale {ct.scale!r}; expected 2**{p.global_scale_bits}.")
    return ct
