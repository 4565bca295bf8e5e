"""The wire format of encrypted vectors, and validation of untrusted payloads.

Everything that arrives over the network (an upload on the server, the
global sum on a client, a checkpoint read back) is checked here, in this
order, and SEAL never sees a byte of it:

1. types (a dict with exactly ``chunks: list[bytes]``, ``length: int``,
   ``fingerprint: str``);
2. the context fingerprint, then the length, then the number of chunks
   (``ceil(length / N)``);
3. each chunk's size, between the entropy floor of one polynomial and the
   uncompressed size of a ciphertext (:meth:`CkksParams.max_chunk_bytes`),
   and its 16-byte SEAL header (:func:`validate_wire`);
4. each chunk parsed completely in Python (:mod:`fedtune.crypto.seal_format`):
   decompressed with a size limit, every header and metadata field compared
   with the context, every coefficient below its prime, the seed fields of a
   seeded upload, and ``c1 != 0`` (a *transparent* ciphertext decrypts to
   values chosen without any key and would move the sum at will);
5. a serialisation rebuilt from the checked numbers is loaded into SEAL
   (:func:`to_seal`), which expands a seeded ``c1``.

:func:`validate_encrypted` runs all five. Once it has accepted payloads,
:func:`fedtune.crypto.sum_encrypted` cannot fail on them: it repeats 4 and 5
(deterministic) and adds the coefficients modulo each prime in numpy.

Why this much: SEAL 4.3's loader, handed the client's bytes after the checks
of 1-3, aborts the process (``std::ios_base::failure`` escapes; SIGABRT) on
some inner headers, e.g. a seed header claiming SEAL 2.x and compression
mode 12, or an inner array header claiming zlib with a size beyond the
input; both are built from a genuine upload without any key
(``tests/test_seal_parse.py``). A Python ``try`` cannot catch an abort.

A chunk that passes every check can still be a well-formed encryption of
garbage, or made under another key with the public fingerprint copied: the
server cannot tell. Key holders can: every upload carries a tag keyed from the
secret key, and a global is used only if its receipts verify and its ``c1`` is
the sum of the listed seeds' expansions (:mod:`fedtune.crypto.receipts`,
:mod:`fedtune.secure.verify`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtune.crypto._seal import parse_header, scratch_dir, seal_dump, seal_load, sealapi
from fedtune.crypto.context import CkksContext
from fedtune.crypto.params import CkksParams
from fedtune.crypto.seal_format import ParsedCiphertext, parse_ciphertext, serialize
from fedtune.errors import PayloadError

__all__ = [
    "EncryptedVector",
    "full_coefficients",
    "load_ciphertext",
    "to_seal",
    "validate_encrypted",
    "validate_wire",
]

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

        Use :func:`validate_encrypted` for anything that came over the network.
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
    """Steps 1-3 of this module's docstring: types, fingerprint, count, sizes, outer header.

    Parses nothing behind the outer header; :func:`validate_encrypted` runs
    this and then checks every chunk completely.

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


def to_seal(ctx: CkksContext, ct: ParsedCiphertext, *, field: str, directory: str) -> Any:
    """Load a SEAL ciphertext from a serialisation rebuilt from checked numbers.

    Parameters
    ----------
    ctx : CkksContext
        Public or secret context.
    ct : ParsedCiphertext
        Output of :func:`fedtune.crypto.seal_format.parse_ciphertext` for ``ctx.layout``.
    field : str
        Name for error messages.
    directory : str
        Scratch directory from :func:`fedtune.crypto._seal.scratch_dir`.

    Raises
    ------
    PayloadError
        If SEAL refuses the rebuilt bytes (it accepts everything the parser
        passes, so that would be a parser bug; the payload is still dropped).
    """
    rebuilt = serialize(ctx.layout, ct, compress=False)
    sealed = sealapi().Ciphertext()
    try:
        seal_load(lambda p: sealed.load(ctx._seal_context, p), rebuilt, directory)
    except (RuntimeError, ValueError) as exc:
        raise PayloadError(f"`{field}`: SEAL refuses the checked ciphertext: {exc}.") from exc
    if sealed.is_transparent():
        raise PayloadError(f"`{field}` is transparent (c1 = 0) after seed expansion; refused.")
    return sealed


def load_ciphertext(
    ctx: CkksContext, data: bytes, *, field: str, directory: str, seeded: bool | None = None
) -> Any:
    """Check untrusted bytes in Python, then load their rebuilt serialisation into SEAL.

    ``seeded`` is passed to :func:`fedtune.crypto.seal_format.parse_ciphertext`.

    Raises
    ------
    PayloadError
        Naming the field and what does not fit ``ctx``.
    """
    return to_seal(
        ctx,
        parse_ciphertext(data, ctx.layout, field=field, seeded=seeded),
        field=field,
        directory=directory,
    )


def full_coefficients(
    ctx: CkksContext, data: bytes, *, field: str, directory: str
) -> NDArray[np.uint64]:
    """Both polynomials of a checked ciphertext, ``uint64`` of shape ``(2, L, N)``.

    A seeded ``c1`` is expanded by SEAL (from a rebuilt serialisation); its
    output is parsed back like any untrusted chunk.

    Raises
    ------
    PayloadError
        If ``data`` does not parse for ``ctx``.
    """
    parsed = parse_ciphertext(data, ctx.layout, field=field)
    if not parsed.seeded:
        return parsed.data
    sealed = to_seal(ctx, parsed, field=field, directory=directory)
    expanded = parse_ciphertext(
        seal_dump(sealed.save, directory), ctx.layout, field=field, seeded=False
    )
    return expanded.data


def validate_encrypted(
    ctx: CkksContext, payload: object, *, length: int, aggregate: bool = False
) -> EncryptedVector:
    """Check an untrusted payload completely (steps 1-5 of this module's docstring).

    Parameters
    ----------
    ctx : CkksContext
        The receiving context (public on the server, secret on a client).
    payload : object
        Anything; it is type-checked first.
    length : int
        Number of values the vector must carry (the adapter size).
    aggregate : bool
        ``False``: a client upload (seeded ciphertexts only, at most
        ``params.max_chunk_bytes(polys=1)`` each). ``True``: a sum from the
        server or a checkpoint (seeded or full, up to ``polys=2``).

    Returns
    -------
    EncryptedVector
        The same bytes, typed; :func:`fedtune.crypto.sum_encrypted` and
        :func:`fedtune.crypto.decrypt_vector` cannot fail on them.

    Raises
    ------
    PayloadError
        Naming the field (e.g. ``chunks[3]``), what came and what was expected.
    """
    params = ctx.params
    enc = validate_wire(
        payload,
        params=params,
        expected_fingerprint=ctx.fingerprint,
        expected_length=length,
        max_chunk_bytes=params.max_chunk_bytes(polys=2 if aggregate else 1),
    )
    with scratch_dir() as tmp:
        for i, chunk in enumerate(enc.chunks):
            parsed = parse_ciphertext(
                chunk, ctx.layout, field=f"chunks[{i}]", seeded=None if aggregate else True
            )
            to_seal(ctx, parsed, field=f"chunks[{i}]", directory=tmp)
    return enc
