"""Verified aggregation: a key holder decrypts only a sum it can prove (issue 27).

Each upload carries a tag only key holders can make (:mod:`fedtune.crypto.receipts`):
HMAC over the run, round, node name, count, seeds and the upload's hash. With the
global sum the server sends what it summed, one *receipt* per upload (name, count,
seeds, hash, tag). A key holder uses the global only if

1. every listed tag verifies for this run and the global's round (else it refuses
   with :data:`BAD_TAGS` and the positions of the failing receipts, so the server
   can drop those uploads, re-sum and resend: see :mod:`fedtune.apps.server.verified`);
2. the names are distinct, at least :func:`min_uploads` of them, and their counts
   add up to the global's ``num-examples``;
3. the global's ``c1`` equals the sum of the listed seeds' expansions, exactly
   (no near-transparent or key-less forgery, no single upload passed off as a sum);
4. it has not used a different global for this round before (:class:`UsedGlobals`;
   the same one again is fine: evaluate and the next train message carry it; after a
   blame step, :mod:`fedtune.secure.blame`, exactly the previous one minus the uploads
   this node blamed is accepted once).

It checks all of this before decrypting, so a refusal is one of the fixed codes
below and never depends on decrypted values. Refusals are :class:`GlobalRefused`
errors whose text is the code alone.

With the ``plain`` codec (encryption off) there is no key and nothing to verify: the
server reads every update anyway; :func:`check_global` accepts the global as before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune import crypto
from fedtune.crypto import receipts
from fedtune.errors import GlobalRefused
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.codec import Codec, WirePayload

__all__ = [
    "BAD_TAGS",
    "C1_MISMATCH",
    "DUPLICATE_NAME",
    "EXAMPLES_MISMATCH",
    "MALFORMED",
    "NO_RECEIPTS",
    "RECEIPT_KEYS",
    "REPLACED",
    "TOO_FEW",
    "Receipt",
    "UsedGlobals",
    "bad_positions",
    "check_global",
    "check_resumed",
    "make_receipt",
    "min_uploads",
    "receipts_from_record",
    "receipts_to_record",
    "sign_upload",
]

NO_RECEIPTS = "global-unverified:no-receipts"
MALFORMED = "global-unverified:malformed-receipts"
BAD_TAGS = "global-unverified:bad-tags"  # + ":" + comma-separated receipt positions
DUPLICATE_NAME = "global-unverified:duplicate-name"
TOO_FEW = "global-unverified:too-few-uploads"
EXAMPLES_MISMATCH = "global-unverified:examples-mismatch"
C1_MISMATCH = "global-unverified:c1-mismatch"
REPLACED = "global-unverified:second-global-for-round"
#: Every refusal a key holder sends about a global (BAD_TAGS with its positions).
CODES = (
    NO_RECEIPTS,
    MALFORMED,
    BAD_TAGS,
    DUPLICATE_NAME,
    TOO_FEW,
    EXAMPLES_MISMATCH,
    C1_MISMATCH,
    REPLACED,
)

#: Keys of the receipts in the server's ``global`` record, one list entry per upload.
RECEIPT_KEYS = (
    "uploads-names",
    "uploads-examples",
    "uploads-seeds",
    "uploads-digests",
    "uploads-tags",
)
_TAG_KEY = "tag"
_MAX_RECEIPTS = 100_000


@dataclass(frozen=True)
class Receipt:
    """What the server lists for one upload it summed."""

    name: str
    num_examples: int
    seeds: bytes
    digest: bytes
    tag: bytes


def _key_holder(codec: Codec) -> CkksCodec | None:
    return codec if isinstance(codec, CkksCodec) and codec.can_decrypt else None


def min_uploads(*, min_clients: int, dp: str) -> int:
    """Fewest distinct uploads a key holder decrypts a sum of.

    ``min-clients``, and never 1 unless each upload is itself a DP release
    (``dp = "example"``): without DP, or with client-level DP (a share carries only
    ``sigma C / sqrt(m - t)`` of the noise), one upload must never be decrypted.
    """
    return max(int(min_clients), 1 if dp == "example" else 2)


def sign_upload(
    codec: Codec,
    payload: WirePayload,
    *,
    run: str,
    server_round: int,
    name: str,
    num_examples: int,
) -> WirePayload:
    """``payload`` with its ``tag`` (a key holder's CKKS upload); unchanged without a key."""
    holder = _key_holder(codec)
    if holder is None:
        return payload
    enc = crypto.EncryptedVector.from_wire(
        {k: payload[k] for k in ("chunks", "length", "fingerprint")}
    )
    tag = receipts.upload_tag(
        receipts.tag_key(holder.context),
        run=run,
        server_round=server_round,
        name=name,
        num_examples=num_examples,
        seeds=receipts.upload_seeds(holder.context, enc),
        digest=receipts.upload_digest(enc),
    )
    return {**payload, _TAG_KEY: tag}


def split_tag(update: Mapping[str, Any]) -> tuple[dict[str, Any], object]:
    """An ``update`` record as (the codec payload, its ``tag`` or None)."""
    payload = dict(update)
    return payload, payload.pop(_TAG_KEY, None)


def make_receipt(
    codec: Codec, payload: WirePayload, tag: object, *, name: str | None, num_examples: int
) -> Receipt | None:
    """The server's receipt of a validated upload (``None`` with a plain codec).

    Raises
    ------
    PayloadError
        If an encrypted upload has no 32-byte ``tag`` or no valid stated name.
    """
    if not isinstance(codec, CkksCodec):
        return None
    tag_bytes = getattr(codec, "tag_bytes", receipts.TAG_BYTES)  # multiparty: Ed25519
    if not isinstance(tag, bytes) or len(tag) != tag_bytes:
        got = f"{len(tag)} bytes" if isinstance(tag, bytes) else type(tag).__name__
        raise PayloadError(
            f"update `tag` must be {tag_bytes} bytes (HMAC-SHA256 under the run's key, or "
            f"the party's Ed25519 signature with ckks-multiparty), got {got}: the client "
            "is older than verified aggregation or has no key."
        )
    if name is None:
        raise PayloadError("an encrypted update needs the client's name in `info.client`.")
    enc = crypto.EncryptedVector.from_wire(payload)
    return Receipt(
        name=name,
        num_examples=num_examples,
        seeds=receipts.upload_seeds(codec.context, enc),
        digest=receipts.upload_digest(enc),
        tag=tag,
    )


def receipts_to_record(items: Sequence[Receipt]) -> dict[str, list[Any]]:
    """The receipts as the ``global`` record's list fields (:data:`RECEIPT_KEYS`)."""
    return {
        "uploads-names": [r.name for r in items],
        "uploads-examples": [r.num_examples for r in items],
        "uploads-seeds": [r.seeds for r in items],
        "uploads-digests": [r.digest for r in items],
        "uploads-tags": [r.tag for r in items],
    }


def receipts_from_record(
    record: Mapping[str, object], *, tag_bytes: int = receipts.TAG_BYTES
) -> list[Receipt]:
    """Receipts from untrusted fields; :class:`GlobalRefused` if absent or malformed.

    ``tag_bytes``: 32 (HMAC, shared-key CKKS) or 64 (Ed25519, ``ckks-multiparty``).
    """
    if not any(k in record for k in RECEIPT_KEYS):
        raise GlobalRefused(NO_RECEIPTS)
    lists = [record.get(k) for k in RECEIPT_KEYS]
    if not all(isinstance(v, list) for v in lists):
        raise GlobalRefused(MALFORMED)
    names, counts, seeds, digests, tags = (list(v) for v in lists)  # type: ignore[call-overload]
    n = len(names)
    if not 1 <= n <= _MAX_RECEIPTS or any(len(v) != n for v in (counts, seeds, digests, tags)):
        raise GlobalRefused(MALFORMED)
    ok = (
        all(isinstance(x, str) and 0 < len(x) <= 64 for x in names)
        and all(type(x) is int and x >= 1 for x in counts)
        and all(isinstance(x, bytes) for x in seeds)
        and all(isinstance(x, bytes) and len(x) == 32 for x in digests)
        and all(isinstance(x, bytes) and len(x) == tag_bytes for x in tags)
    )
    if not ok:
        raise GlobalRefused(MALFORMED)
    return [Receipt(*fields) for fields in zip(names, counts, seeds, digests, tags, strict=True)]


def bad_positions(code: str) -> list[int] | None:
    """The receipt positions a :data:`BAD_TAGS` refusal names (``None`` for another code)."""
    prefix = BAD_TAGS + ":"
    if not code.startswith(prefix):
        return None
    try:
        return sorted({int(p) for p in code[len(prefix) :].split(",")})
    except ValueError:
        return None


def _global_digest(payload: Mapping[str, Any], num_examples: int, items: Sequence[Receipt]) -> str:
    h = hashlib.sha256(b"fedtune/global/v1\x00")
    h.update(receipts.upload_digest(crypto.EncryptedVector.from_wire(payload)))
    h.update(str(num_examples).encode() + b"\x00")
    for r in items:
        h.update(r.tag)
    return h.hexdigest()


class UsedGlobals:
    """The digest of the global a key holder used for each round (one per round).

    Kept in a JSON file the node writes itself (replaced atomically); ``None`` keeps
    it in memory (a test, or a client without a directory).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: dict[str, str] = {}

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return self._memory
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise ValueError(
                f"{str(self.path)!r} (the globals this node used) is not JSON ({err}); "
                "restore it or remove it only if this run's rounds are over."
            ) from err
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{str(self.path)!r} must map run/round to a digest.")
        return data

    def claim(self, key: str, digest: str, tags: Sequence[str] = ()) -> None:
        """Record ``digest`` (and the receipts' ``tags``) for ``key``.

        :data:`REPLACED` if another digest is recorded, unless this node answered a
        blame step for it (:meth:`note_blamed`) and ``tags`` are exactly the recorded
        ones minus those it blamed: one such replacement per blame.
        """
        used = self._load()
        if key in used and not hmac.compare_digest(used[key], digest):
            blamed = used.get(f"{key}/blamed")
            old = set(used.get(f"{key}/tags", "").split(",")) - {""}
            if blamed is None or set(tags) != old - set(blamed.split(",")):
                raise GlobalRefused(REPLACED)
            del used[f"{key}/blamed"]  # one replacement per blame
        elif key in used:
            return
        used[key] = digest
        used[f"{key}/tags"] = ",".join(tags)
        self._save(used)

    def note_blamed(self, key: str, tags: Sequence[str]) -> None:
        """Remember that this node blamed the uploads with ``tags`` in ``key``'s global."""
        used = self._load()
        used[f"{key}/blamed"] = ",".join(tags)
        self._save(used)

    def _save(self, used: dict[str, str]) -> None:
        if self.path is None:
            self._memory = used
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(used, sort_keys=True))
        os.replace(tmp, self.path)


def check_global(
    codec: Codec,
    record: Mapping[str, object],
    payload: WirePayload,
    num_examples: int,
    *,
    run: str,
    server_round: int,
    min_count: int,
    used: UsedGlobals,
) -> None:
    """Points 1-4 of this module's docstring, in that order, before any decryption.

    Parameters
    ----------
    codec : Codec
        The key holder's codec; a plain one (no key) accepts as before.
    record : Mapping[str, object]
        The server's ``global`` record (the receipts are read from it).
    payload, num_examples
        The global sum (already shaped by the caller) and its count.
    run, server_round
        This run's name and the round whose sum the global is.
    min_count
        :func:`min_uploads` for this node.
    used : UsedGlobals
        This node's record of the globals it used.

    Raises
    ------
    GlobalRefused
        With one of :data:`CODES`.
    PayloadError
        If the global itself does not validate.
    """
    holder = _key_holder(codec)
    if holder is None:
        return
    items = receipts_from_record(record)
    checked = holder.validate(payload, aggregate=True)
    key = receipts.tag_key(holder.context)
    bad = [
        i
        for i, r in enumerate(items)
        if not hmac.compare_digest(
            r.tag,
            receipts.upload_tag(
                key,
                run=run,
                server_round=server_round,
                name=r.name,
                num_examples=r.num_examples,
                seeds=r.seeds,
                digest=r.digest,
            ),
        )
    ]
    if bad:
        raise GlobalRefused(f"{BAD_TAGS}:{','.join(map(str, bad))}")
    if len({r.name for r in items}) != len(items):
        raise GlobalRefused(DUPLICATE_NAME)
    if len(items) < min_count:
        raise GlobalRefused(TOO_FEW)
    if sum(r.num_examples for r in items) != num_examples:
        raise GlobalRefused(EXAMPLES_MISMATCH)
    enc = crypto.EncryptedVector.from_wire(checked)
    try:
        matches = receipts.c1_matches(holder.context, enc, [r.seeds for r in items])
    except crypto.PayloadError:
        matches = False
    if not matches:
        raise GlobalRefused(C1_MISMATCH)
    used.claim(
        f"{run}/{server_round}",
        _global_digest(checked, num_examples, items),
        [r.tag.hex() for r in items],
    )


def check_resumed(
    codec: Codec, payload: WirePayload, num_examples: int, items: Sequence[Receipt]
) -> None:
    """The server's check of a checkpointed global (no key needed).

    An encrypted global must list its receipts, distinct names whose counts add up
    to ``num_examples``, and have ``c1`` equal to the sum of their seeds'
    expansions: a near-transparent forgery (``c1`` = 1) or a sum made without the
    seeds is refused before any key holder is sent it. Tags cannot be checked here.

    Raises
    ------
    PayloadError
        Naming what does not hold and what to do.
    """
    if not isinstance(codec, CkksCodec):
        return
    remedy = "restore the checkpoint the server wrote, or start a new run-dir"
    if not items:
        raise PayloadError(
            f"the checkpointed global lists no uploads (receipts); key holders refuse such a "
            f"sum: {remedy}."
        )
    if len({r.name for r in items}) != len(items):
        raise PayloadError(f"the checkpointed global lists one client twice: {remedy}.")
    total = sum(r.num_examples for r in items)
    if total != num_examples:
        raise PayloadError(
            f"the checkpointed global's receipts count {total} examples, its `num-examples` "
            f"is {num_examples}: {remedy}."
        )
    enc = crypto.EncryptedVector.from_wire(payload)
    try:
        matches = receipts.c1_matches(codec.context, enc, [r.seeds for r in items])
    except crypto.PayloadError:
        matches = False
    if not matches:
        raise PayloadError(
            f"the checkpointed global's c1 is not the sum of the {len(items)} listed uploads' "
            f"seeds (a forged or near-transparent ciphertext): {remedy}."
        )
