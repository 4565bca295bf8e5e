"""The blame step: which well-formed, authenticated upload makes a verified sum unusable.

Only with ``dp = "example"``: each upload is then itself an accounted DP release of its
node, so a key holder may decrypt it alone. The server sends a round's uploads with
their receipts; each key holder checks every upload against its own bytes (seeds and
hash recomputed, tag verified), decrypts it alone, applies the node's value check to
``n_k w_k`` and answers the positions that fail (:data:`BLAME` + positions). What it
reveals: each upload of that round to the key holders (covered by each uploader's ε),
and to the server which uploads failed (post-processing of DP releases). Without DP,
or with client-level DP (a share carries only ``σ C / sqrt(m - t)`` of the noise), no
single upload may be decrypted: a key holder answers :data:`BLAME_REFUSED`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedtune import crypto
from fedtune.crypto import receipts
from fedtune.errors import GlobalRefused
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.secure.codec import Codec, WirePayload
from fedtune.secure.verify import (
    MALFORMED,
    Receipt,
    _key_holder,
    receipts_from_record,
    receipts_to_record,
)

__all__ = ["BLAME", "BLAME_REFUSED", "blame_positions", "blame_to_record", "parse_blame"]


#: Prefix of a key holder's blame answer: ``blame:`` + comma-separated positions (or none).
BLAME = "blame:"
#: A key holder refuses to decrypt single uploads unless each is a DP release.
BLAME_REFUSED = "blame-refused:not-example-level-dp"


def blame_to_record(uploads: Sequence[WirePayload], items: Sequence[Receipt]) -> dict[str, Any]:
    """A blame request's record: every upload's chunks, flattened, and their receipts."""
    chunks = [c for u in uploads for c in u["chunks"]]
    return {"uploads-chunks": chunks, **receipts_to_record(items)}


def blame_positions(
    codec: Codec,
    record: Mapping[str, object],
    *,
    run: str,
    server_round: int,
    within_bounds: Callable[[Any, int], bool],
) -> list[int]:
    """The uploads of a blame request that a key holder finds out of bounds (or forged).

    Each listed upload is checked against its own bytes (seeds and hash recomputed, tag
    verified) and decrypted *alone*, which is why only ``dp = "example"`` allows it:
    each upload is then an accounted DP release of its node. ``within_bounds(prescaled,
    n)`` is the node's value check of one ``n_k w_k``.

    Raises
    ------
    GlobalRefused
        :data:`MALFORMED` if the request does not parse.
    """
    holder = _key_holder(codec)
    if holder is None:
        return []
    items = receipts_from_record(record)
    chunks = record.get("uploads-chunks")
    per = holder.context.params.chunk_count(holder.length)
    if not isinstance(chunks, list) or len(chunks) != per * len(items):
        raise GlobalRefused(MALFORMED)
    key = receipts.tag_key(holder.context)
    blamed = []
    for i, r in enumerate(items):
        payload = {
            "chunks": list(chunks[i * per : (i + 1) * per]),
            "length": holder.length,
            "fingerprint": holder.fingerprint,
        }
        try:
            checked = holder.validate(payload)
            enc = crypto.EncryptedVector.from_wire(checked)
            seeds, digest = receipts.upload_seeds(holder.context, enc), receipts.upload_digest(enc)
        except (PayloadError, crypto.PayloadError):
            blamed.append(i)
            continue
        tag = receipts.upload_tag(
            key,
            run=run,
            server_round=server_round,
            name=r.name,
            num_examples=r.num_examples,
            seeds=seeds,
            digest=digest,
        )
        authentic = hmac.compare_digest(tag, r.tag) and (seeds, digest) == (r.seeds, r.digest)
        # decrypted alone only once authenticated: a DP release of the node that tagged it
        if not authentic or not within_bounds(holder.decode(checked), r.num_examples):
            blamed.append(i)
    return blamed


def parse_blame(answer: object) -> set[int] | None:
    """The positions in a key holder's :data:`BLAME` answer (``None`` if it is not one)."""
    if not isinstance(answer, str) or not answer.startswith(BLAME) or len(answer) > 600_000:
        return None
    rest = answer[len(BLAME) :]
    try:
        return {int(p) for p in rest.split(",")} if rest else set()
    except ValueError:
        return None
