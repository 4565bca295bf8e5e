"""A checkpoint's ``receipts.bin``: what an encrypted global sums, as bytes read back later.

Read back from disk, so parsed as untrusted input: every length is checked before it
is used, and nothing may follow the last receipt.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from fedtune.crypto import receipts
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.secure.verify import Receipt

__all__ = ["receipts_from_bytes", "receipts_to_bytes"]

_MAX_RECEIPTS = 100_000


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RECEIPTS_MAGIC = b"fedtune-receipts-1\n"


def receipts_to_bytes(items: Sequence[Receipt]) -> bytes:
    """A checkpoint's ``receipts.bin``: count, then per receipt its length-prefixed fields."""
    out = [_RECEIPTS_MAGIC, _U32.pack(len(items))]
    for r in items:
        name = r.name.encode()
        out += [_U32.pack(len(name)), name, _U64.pack(r.num_examples)]
        out += [_U32.pack(len(r.seeds)), r.seeds, r.digest, r.tag]
    return b"".join(out)


def receipts_from_bytes(data: bytes) -> list[Receipt]:
    """Inverse of :func:`receipts_to_bytes` for untrusted bytes; :class:`PayloadError` naming
    the receipt and field that does not parse."""
    if not data.startswith(_RECEIPTS_MAGIC):
        raise PayloadError("receipts do not start with 'fedtune-receipts-1'.")
    pos = len(_RECEIPTS_MAGIC)

    def take(size: int, what: str) -> bytes:
        nonlocal pos
        if size < 0 or pos + size > len(data):
            raise PayloadError(f"receipts end inside {what} (offset {pos}, {size} bytes wanted).")
        pos += size
        return data[pos - size : pos]

    (count,) = _U32.unpack(take(4, "the count"))
    if count > _MAX_RECEIPTS:
        raise PayloadError(f"receipts count {count}; at most {_MAX_RECEIPTS}.")
    items = []
    for k in range(count):
        (n_name,) = _U32.unpack(take(4, f"receipt {k} name size"))
        if not 1 <= n_name <= 64:
            raise PayloadError(f"receipt {k} name is {n_name} bytes; expected 1..64.")
        try:
            name = take(n_name, f"receipt {k} name").decode()
        except UnicodeDecodeError as err:
            raise PayloadError(f"receipt {k} name is not UTF-8.") from err
        (n,) = _U64.unpack(take(8, f"receipt {k} count"))
        (n_seeds,) = _U32.unpack(take(4, f"receipt {k} seed size"))
        seeds = take(n_seeds, f"receipt {k} seeds")
        digest = take(32, f"receipt {k} digest")
        tag = take(receipts.TAG_BYTES, f"receipt {k} tag")
        if n < 1:
            raise PayloadError(f"receipt {k} counts {n} examples; expected at least 1.")
        items.append(Receipt(name, n, seeds, digest, tag))
    if pos != len(data):
        raise PayloadError(f"receipts have {len(data) - pos} bytes after the last one.")
    return items
