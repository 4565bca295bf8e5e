"""SEAL's serialised CKKS secret key, parsed and rebuilt in Python, byte for byte.

A ``secret.ctx`` is a file a process did not write itself: it is untrusted input
like an upload (STYLE rule 13). Its ``key_id`` is a public hash of the key bytes,
so anyone can write a context file around *any* bytes with a consistent
``key_id`` and fingerprint; before this module, one whose inner array header
claimed zlib and more bytes than follow aborted the process inside SEAL
(``std::ios_base::failure``, exit -6) as it loaded the key
(``tests/test_context_files.py``). So, as for ciphertexts
(:mod:`fedtune.crypto.seal_format`), SEAL only ever loads a serialisation
rebuilt here from checked numbers.

Layout accepted (SEAL 4.3, ``SecretKey::save``, i.e. ``Plaintext::save``, little
endian)::

    SEALHeader (16 B)   magic 0xA15E, header_size 16, this build's version,
                        compr_mode 0 (none) or 2 (zstd), reserved 0, size == len
    members, zstd-compressed if compr_mode is 2:
      parms_id          4 x uint64   the context's key-level parms_id
      coeff_count       uint64       N K (K: every prime of the context)
      scale             float64      1.0
      DynArray          SEALHeader (compr none, size 24 + 8 N K), uint64 N K,
                        N K coefficients, coefficient j of prime i below p_i
    nothing after.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from fedtune.crypto.seal_format import (
    _HEADER,
    COMPR_NONE,
    COMPR_ZSTD,
    CiphertextLayout,
    _check_header,
    unzstd,
)
from fedtune.errors import PayloadError

__all__ = ["KeyLayout", "parse_secret_key"]

_META = struct.Struct("<4QQd")  # parms_id, coeff_count, scale
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class KeyLayout:
    """What the secret key of one context must look like.

    Attributes
    ----------
    version : tuple[int, int]
        SEAL version of this build.
    parms_id : tuple[int, int, int, int]
        The context's key-level ``parms_id``.
    poly_modulus_degree : int
        ``N``.
    primes : tuple[int, ...]
        Every prime of the context (the key level holds them all).
    """

    version: tuple[int, int]
    parms_id: tuple[int, int, int, int]
    poly_modulus_degree: int
    primes: tuple[int, ...]

    @property
    def count(self) -> int:
        """Coefficients of the key: ``N K``."""
        return self.poly_modulus_degree * len(self.primes)

    @property
    def members_size(self) -> int:
        """Bytes behind the outer header, uncompressed."""
        return _META.size + _HEADER.size + _U64.size + 8 * self.count

    def _header(self, *, compr_mode: int, size: int) -> bytes:
        layout = CiphertextLayout(self.version, self.parms_id, self.poly_modulus_degree, (), 1.0)
        return layout.header(compr_mode=compr_mode, size=size)


def parse_secret_key(data: bytes, layout: KeyLayout, *, field: str = "secret_key") -> bytes:
    """Check a serialised secret key completely; return an uncompressed rebuild for SEAL.

    Parameters
    ----------
    data : bytes
        Untrusted bytes, supposedly ``SecretKey::save`` output.
    layout : KeyLayout
        The context's key layout.
    field : str
        Name for error messages.

    Returns
    -------
    bytes
        A serialisation written from the checked numbers only (compression none).

    Raises
    ------
    PayloadError
        Naming the field, the part that failed, what came and what was expected.
    """
    if len(data) < _HEADER.size:
        raise PayloadError(f"`{field}` is {len(data)} bytes, shorter than a SEAL header.")
    dummy = CiphertextLayout(layout.version, layout.parms_id, layout.poly_modulus_degree, (), 1.0)
    compr, size = _check_header(data, 0, dummy, compr_modes=(COMPR_NONE, COMPR_ZSTD), field=field)
    if size != len(data):
        raise PayloadError(
            f"`{field}` declares {size} bytes in its SEAL header but has {len(data)}; "
            "the file is truncated or padded: restore secret.ctx from `fedtune keygen`."
        )
    body = data[_HEADER.size :]
    limit = layout.members_size
    members = body if compr == COMPR_NONE else unzstd(body, limit=limit, field=field)
    if len(members) != limit:
        raise PayloadError(
            f"`{field}` holds {len(members)} bytes of members; a key of {layout.count} "
            f"coefficients takes {limit}."
        )
    *parms_id, coeff_count, scale = _META.unpack_from(members, 0)
    if tuple(parms_id) != layout.parms_id or coeff_count != layout.count or scale != 1.0:
        raise PayloadError(
            f"`{field}` metadata (parms_id {tuple(parms_id)}, {coeff_count} coefficients, "
            f"scale {scale}) does not fit this context (parms_id {layout.parms_id}, "
            f"{layout.count} coefficients, scale 1.0): a key of other parameters."
        )
    pos = _META.size
    array_header = layout._header(compr_mode=COMPR_NONE, size=_HEADER.size + 8 + 8 * layout.count)
    if members[pos : pos + _HEADER.size] != array_header:
        _check_header(members, pos, dummy, compr_modes=(COMPR_NONE,), field=field)
        raise PayloadError(
            f"`{field}` coefficient array header declares "
            f"{_HEADER.unpack_from(members, pos)[-1]} bytes; expected "
            f"{_HEADER.size + 8 + 8 * layout.count}."
        )
    pos += _HEADER.size
    (stored,) = _U64.unpack_from(members, pos)
    if stored != layout.count:
        raise PayloadError(f"`{field}` stores {stored} coefficients; expected {layout.count}.")
    pos += _U64.size
    coeffs = np.frombuffer(members, dtype="<u8", count=layout.count, offset=pos)
    coeffs = coeffs.reshape(len(layout.primes), layout.poly_modulus_degree)
    primes = np.array(layout.primes, dtype=np.uint64)[:, None]
    too_big = coeffs >= primes
    if too_big.any():
        prime, j = (int(v[0]) for v in np.nonzero(too_big))
        raise PayloadError(
            f"`{field}` coefficient {j} is {int(coeffs[prime, j])}, not below its prime "
            f"p_{prime} = {layout.primes[prime]}."
        )
    rebuilt = b"".join(
        [
            _META.pack(*layout.parms_id, layout.count, 1.0),
            array_header,
            _U64.pack(layout.count),
            np.ascontiguousarray(coeffs, dtype="<u8").tobytes(),
        ]
    )
    return layout._header(compr_mode=COMPR_NONE, size=_HEADER.size + len(rebuilt)) + rebuilt
