"""SEAL's serialised CKKS ciphertext, parsed and rebuilt in Python, byte for byte.

Why not let SEAL parse it: SEAL 4.3's loader aborts the whole process on some
malformed *inner* headers (an ``std::ios_base::failure`` escapes from a
nested ``Serialization::Load``; ``terminate`` is called; no Python ``try``
can catch it). Two such payloads are known (``tests/test_seal_parse.py``),
both made from a genuine upload without any key. So no byte from the
network reaches SEAL: :func:`parse_ciphertext` decompresses the chunk itself
(with a size limit), checks every field against the receiving context, and
:func:`serialize` writes a fresh serialisation from the checked numbers.
SEAL only ever loads bytes built here.

Layout accepted (SEAL 4.3, ``Ciphertext::save``, little endian)::

    SEALHeader (16 B)  magic 0xA15E, header_size 16, version of this build,
                       compr_mode 0 (none) or 2 (zstd), reserved 0,
                       size == len(chunk)
    then the members, zstd-compressed if compr_mode is 2:
      parms_id             4 x uint64    the context's data level
      is_ntt_form          uint8         1 (CKKS ciphertexts are in NTT form)
      size                 uint64        2 polynomials
      poly_modulus_degree  uint64        N
      coeff_modulus_size   uint64        L
      scale                float64       2 ** global_scale_bits
      correction_factor    uint64        1
      DynArray             SEALHeader (compr none, size 24 + 8 count),
                           uint64 count, count x uint64 coefficients:
                           count == 2 N L (full) or N L (seeded: c0 only);
                           coefficient j of prime i below q_i
      seeded only:         UniformRandomGeneratorInfo: SEALHeader (compr
                           none, size 81), uint8 prng_type (1 blake2xb or
                           2 shake256), 64 seed bytes
    nothing after.

A full ciphertext whose second polynomial ``c1`` is zero modulo any prime is
*transparent*: it decrypts to ``c0``, an encoding of values chosen by whoever
wrote it, without any key. It would move the encrypted sum by those values;
it is rejected. (A seeded ``c1`` comes out of a CSPRNG and is never zero.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedtune.errors import PayloadError

__all__ = ["CiphertextLayout", "ParsedCiphertext", "parse_ciphertext", "serialize", "unzstd"]

_HEADER = struct.Struct("<HBBBBHQ")
SEAL_MAGIC = 0xA15E
COMPR_NONE, COMPR_ZSTD = 0, 2
_COMPR_NAMES = {0: "none", 1: "zlib", 2: "zstd"}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A frame's window never needs to exceed the object (at most 2 N L 8 + 97 bytes);
# the cap stops a forged frame header from reserving memory.
_MAX_ZSTD_WINDOW = 1 << 20
# SEAL writes zstd at its default level; level 3 reproduces SEAL's output size.
_ZSTD_LEVEL = 3
_META = struct.Struct("<4QBQQQdQ")  # parms_id, ntt, size, N, L, scale, correction factor
_U64 = struct.Struct("<Q")
_SEED_BYTES = 64
_PRNG_TYPES = {1: "blake2xb", 2: "shake256"}
_PRNG_INFO_SIZE = _HEADER.size + 1 + _SEED_BYTES


@dataclass(frozen=True)
class CiphertextLayout:
    """What every ciphertext of one context must look like.

    Attributes
    ----------
    version : tuple[int, int]
        SEAL version of this build, written in every header.
    parms_id : tuple[int, int, int, int]
        The context's data-level ``parms_id``.
    poly_modulus_degree : int
        ``N``.
    primes : tuple[int, ...]
        The data-level primes ``q_0 .. q_{L-1}``.
    scale : float
        ``2 ** global_scale_bits``.
    """

    version: tuple[int, int]
    parms_id: tuple[int, int, int, int]
    poly_modulus_degree: int
    primes: tuple[int, ...]
    scale: float

    @property
    def metadata(self) -> bytes:
        """The 73 bytes in front of the coefficients, identical for all our ciphertexts."""
        n, lvl = self.poly_modulus_degree, len(self.primes)
        return _META.pack(*self.parms_id, 1, 2, n, lvl, self.scale, 1)

    def coefficient_count(self, *, seeded: bool) -> int:
        """Coefficients stored: ``N L`` when seeded (c0 only), else ``2 N L``."""
        return (1 if seeded else 2) * self.poly_modulus_degree * len(self.primes)

    def members_size(self, *, seeded: bool) -> int:
        """Bytes of the members behind the outer header, uncompressed."""
        count = self.coefficient_count(seeded=seeded)
        extra = _PRNG_INFO_SIZE if seeded else 0
        return _META.size + _HEADER.size + _U64.size + 8 * count + extra

    def header(self, *, compr_mode: int, size: int) -> bytes:
        """A SEALHeader of this build."""
        major, minor = self.version
        return _HEADER.pack(SEAL_MAGIC, _HEADER.size, major, minor, compr_mode, 0, size)


@dataclass(frozen=True, eq=False)
class ParsedCiphertext:
    """A checked ciphertext, as numbers.

    Attributes
    ----------
    data : numpy.ndarray
        ``uint64`` of shape ``(polys, L, N)``: ``polys`` is 1 for a seeded
        ciphertext (``c0`` only), 2 otherwise; every value below its prime.
    prng_info : bytes or None
        For a seeded ciphertext, the PRNG type byte and the 64-byte seed
        that generate ``c1``; ``None`` otherwise.
    """

    data: NDArray[np.uint64]
    prng_info: bytes | None

    @property
    def seeded(self) -> bool:
        """Whether ``c1`` is stored as a seed."""
        return self.prng_info is not None


def _check_header(
    data: bytes, offset: int, layout: CiphertextLayout, *, compr_modes: tuple[int, ...], field: str
) -> tuple[int, int]:
    magic, hsize, major, minor, compr, reserved, size = _HEADER.unpack_from(data, offset)
    where = "" if offset == 0 else f" at inner offset {offset}"
    if magic != SEAL_MAGIC or hsize != _HEADER.size or reserved != 0:
        raise PayloadError(
            f"`{field}` has no SEAL header{where} (magic=0x{magic:04X}, header_size={hsize}, "
            f"reserved={reserved}; expected 0x{SEAL_MAGIC:04X}, 16, 0)."
        )
    if (major, minor) != layout.version:
        raise PayloadError(
            f"`{field}` has a SEAL {major}.{minor} header{where}; this build reads and writes "
            f"{layout.version[0]}.{layout.version[1]}."
        )
    if compr not in compr_modes:
        allowed = ", ".join(f"{m} ({_COMPR_NAMES[m]})" for m in compr_modes)
        raise PayloadError(f"`{field}` has compression mode {compr}{where}; accepted: {allowed}.")
    return compr, size


def unzstd(body: bytes, *, limit: int, field: str) -> bytes:
    import zstandard

    if body[:4] != _ZSTD_MAGIC:
        raise PayloadError(f"`{field}` declares zstd but its body is not a zstd frame.")
    try:
        frame = zstandard.get_frame_parameters(body)
        if frame.dict_id != 0:
            raise PayloadError(f"`{field}` is a zstd frame with a dictionary ({frame.dict_id}).")
        if frame.window_size > _MAX_ZSTD_WINDOW or (
            frame.content_size != zstandard.CONTENTSIZE_UNKNOWN and frame.content_size > limit
        ):
            raise PayloadError(
                f"`{field}` is a zstd frame of {frame.content_size} bytes (window "
                f"{frame.window_size}); a ciphertext takes at most {limit}."
            )
        out = zstandard.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW).decompress(
            body, max_output_size=limit, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise PayloadError(f"`{field}` does not decompress: {exc}.") from exc
    if len(out) > limit:  # content size unknown and the library's bound not honoured
        raise PayloadError(f"`{field}` decompresses to more than {limit} bytes.")
    return out


def parse_ciphertext(
    data: bytes, layout: CiphertextLayout, *, field: str, seeded: bool | None = None
) -> ParsedCiphertext:
    """Check a serialised ciphertext completely, in Python, and return its numbers.

    Parameters
    ----------
    data : bytes
        Untrusted bytes, supposedly SEAL's ``Ciphertext::save`` output.
    layout : CiphertextLayout
        The receiving context's layout (:attr:`CkksContext.layout`).
    field : str
        Name of the field the bytes came from, for error messages.
    seeded : bool or None
        ``True``: only a seeded ciphertext (a fresh upload) is accepted;
        ``False``: only a full one; ``None``: either.

    Returns
    -------
    ParsedCiphertext
        The coefficients (a read-only view of the decompressed bytes) and
        the seed.

    Raises
    ------
    PayloadError
        Naming the field, the part that failed, what came and what was expected.
    """
    if not isinstance(data, bytes):
        raise PayloadError(f"`{field}` should be bytes, got {type(data).__name__}.")
    if len(data) < _HEADER.size:
        raise PayloadError(f"`{field}` is {len(data)} bytes, shorter than a SEAL header.")
    compr, size = _check_header(data, 0, layout, compr_modes=(COMPR_NONE, COMPR_ZSTD), field=field)
    if size != len(data):
        raise PayloadError(
            f"`{field}` declares {size} bytes in its SEAL header but has {len(data)}."
        )
    sizes = {
        layout.members_size(seeded=s): s for s in (True, False) if seeded is None or s == seeded
    }
    limit = max(sizes)
    body = data[_HEADER.size :]
    members = body if compr == COMPR_NONE else unzstd(body, limit=limit, field=field)
    if len(members) not in sizes:
        expected = " or ".join(f"{n} ({'seeded' if s else 'full'})" for n, s in sizes.items())
        raise PayloadError(
            f"`{field}` holds {len(members)} bytes of ciphertext members; expected {expected}."
        )
    is_seeded = sizes[len(members)]
    meta = layout.metadata
    if members[: len(meta)] != meta:
        got = _META.unpack_from(members)
        raise PayloadError(
            f"`{field}` metadata (parms_id, ntt, size, N, L, scale, correction) = "
            f"{got[:4]}, {got[4:]} does not match this context's {_META.unpack(meta)[4:]} "
            "and parms_id: another context, level or scale."
        )
    count = layout.coefficient_count(seeded=is_seeded)
    pos = len(meta)
    array_header = layout.header(compr_mode=COMPR_NONE, size=_HEADER.size + 8 + 8 * count)
    if members[pos : pos + _HEADER.size] != array_header:
        _check_header(members, pos, layout, compr_modes=(COMPR_NONE,), field=field)
        declared = _HEADER.unpack_from(members, pos)[-1]
        raise PayloadError(
            f"`{field}` coefficient array header declares {declared} bytes; "
            f"expected {_HEADER.size + 8 + 8 * count}."
        )
    pos += _HEADER.size
    (stored,) = _U64.unpack_from(members, pos)
    if stored != count:
        raise PayloadError(f"`{field}` stores {stored} coefficients; expected {count}.")
    pos += _U64.size
    n, lvl = layout.poly_modulus_degree, len(layout.primes)
    coeffs = np.frombuffer(members, dtype="<u8", count=count, offset=pos).reshape(-1, lvl, n)
    primes = np.array(layout.primes, dtype=np.uint64)
    too_big = coeffs >= primes[None, :, None]
    if too_big.any():
        poly, prime, j = (int(v[0]) for v in np.nonzero(too_big))
        raise PayloadError(
            f"`{field}` coefficient {j} of polynomial {poly} is {int(coeffs[poly, prime, j])}, "
            f"not below its prime q_{prime} = {layout.primes[prime]}."
        )
    pos += 8 * count
    prng_info: bytes | None = None
    if is_seeded:
        info_header = layout.header(compr_mode=COMPR_NONE, size=_PRNG_INFO_SIZE)
        if members[pos : pos + _HEADER.size] != info_header:
            _check_header(members, pos, layout, compr_modes=(COMPR_NONE,), field=field)
            raise PayloadError(
                f"`{field}` PRNG seed header declares {_HEADER.unpack_from(members, pos)[-1]} "
                f"bytes; expected {_PRNG_INFO_SIZE}."
            )
        pos += _HEADER.size
        if members[pos] not in _PRNG_TYPES:
            raise PayloadError(
                f"`{field}` PRNG type is {members[pos]}; expected one of {_PRNG_TYPES}."
            )
        prng_info = bytes(members[pos : pos + 1 + _SEED_BYTES])
    else:
        zero = np.flatnonzero(~coeffs[1].any(axis=1))
        if zero.size:
            raise PayloadError(
                f"`{field}` is transparent: its c1 is zero modulo q_{int(zero[0])}, so it "
                "decrypts to values chosen without any key; refused."
            )
    return ParsedCiphertext(data=coeffs, prng_info=prng_info)


def serialize(layout: CiphertextLayout, ct: ParsedCiphertext, *, compress: bool) -> bytes:
    """Write ``ct`` the way SEAL's ``Ciphertext::save`` does, from the numbers only.

    Parameters
    ----------
    layout : CiphertextLayout
        The context's layout; gives every header and metadata field.
    ct : ParsedCiphertext
        Checked coefficients (and seed).
    compress : bool
        zstd (what goes on the wire) or none (what is handed to SEAL).
    """
    count = layout.coefficient_count(seeded=ct.seeded)
    coeffs = np.ascontiguousarray(ct.data, dtype="<u8")
    if coeffs.size != count:
        raise ValueError(f"`ct.data` holds {coeffs.size} coefficients; the layout needs {count}.")
    parts = [
        layout.metadata,
        layout.header(compr_mode=COMPR_NONE, size=_HEADER.size + 8 + 8 * count),
        _U64.pack(count),
        coeffs.tobytes(),
    ]
    if ct.prng_info is not None:
        parts += [layout.header(compr_mode=COMPR_NONE, size=_PRNG_INFO_SIZE), ct.prng_info]
    members = b"".join(parts)
    if compress:
        import zstandard

        members = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=False).compress(
            members
        )
    mode = COMPR_ZSTD if compress else COMPR_NONE
    return layout.header(compr_mode=mode, size=_HEADER.size + len(members)) + members
