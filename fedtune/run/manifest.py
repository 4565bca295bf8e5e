"""The ``state.json`` of a checkpoint: its fields, their checks, its HMAC.

:func:`parse_state` reads the JSON with no ``NaN``/``Infinity``, no floats, no
integers longer than 32 digits and a nesting limit; :func:`check_fields` checks each
field's type and range and names the field and what it held; :func:`mac` is the
HMAC-SHA256 over the canonical JSON of every field but the HMAC itself. The layout
and what the checks stop are described in :mod:`fedtune.run.checkpoint`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from fedtune.errors import CheckpointError

__all__ = [
    "FORMAT",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MAX_EXAMPLES",
    "MAX_FINGERPRINT",
    "MAX_LENGTH",
    "MAX_ROUND",
    "MAX_STATE_BYTES",
    "Fields",
    "check_fields",
    "mac",
    "parse_state",
]


FORMAT = "fedtune-checkpoint-2"
MAX_STATE_BYTES = 1 << 20
MAX_ROUND = 10**6
MAX_EXAMPLES = 10**9
MAX_LENGTH = 10**9
MAX_FINGERPRINT = 256
MAX_CHUNKS = 4096
MAX_CHUNK_BYTES = 256 << 20  # a plain float64 adapter of 33M parameters

_FIELDS = (
    "format",
    "round",
    "num-examples",
    "length",
    "fingerprint",
    "chunks",
    "chunk-bytes",
    "hmac-sha256",
)
#: Optional: ``[sha256 hex, size]`` of ``receipts.bin``, what an encrypted global sums.
_OPTIONAL = ("receipts",)
MAX_RECEIPTS_BYTES = 64 << 20
_HEX = frozenset("0123456789abcdef")


class _Literal:
    """A JSON number or constant that no field accepts (kept as text for the error)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text if len(self.text) <= 40 else self.text[:40] + "..."


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _is_hex_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _int_field(value: object, label: str, low: int, high: int, where: str) -> int:
    if type(value) is not int or not low <= value <= high:  # `type`: True is no count
        raise CheckpointError(
            f"Checkpoint field {label} must be an integer in {low}..{high}; got {_show(value)} "
            f"(in {where})."
        )
    return value


@dataclass(frozen=True)
class Fields:
    """``state.json`` after its types and ranges passed (its HMAC not yet checked)."""

    round: int
    num_examples: int
    length: int
    fingerprint: str
    digests: list[str]
    sizes: list[int]
    receipts: tuple[str, int] | None = None


def check_fields(
    manifest: dict[str, object], where: str, *, max_examples: int, max_chunk_bytes: int
) -> Fields:
    """Check every field's type and range (not the HMAC); raise CheckpointError naming it."""
    missing = [k for k in _FIELDS if k not in manifest]
    unexpected = [_show(k) for k in manifest if k not in _FIELDS + _OPTIONAL][:5]
    if missing or unexpected:
        found = [f"missing {', '.join(map(repr, missing))}"] if missing else []
        found += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        legacy = (
            "; a checkpoint written before fedtune signed its checkpoints cannot be resumed"
            if "hmac-sha256" in missing
            else ""
        )
        raise CheckpointError(
            f"{where} fields must be exactly {', '.join(_FIELDS)}; {'; '.join(found)}{legacy}."
        )
    if manifest["format"] != FORMAT:
        raise CheckpointError(
            f"Checkpoint field `format` must be {FORMAT!r}; got {_show(manifest['format'])} "
            f"(in {where})."
        )
    round_ = _int_field(manifest["round"], "`round`", 0, MAX_ROUND, where)
    examples = _int_field(manifest["num-examples"], "`num-examples`", 1, max_examples, where)
    length = _int_field(manifest["length"], "`length`", 1, MAX_LENGTH, where)
    fingerprint = manifest["fingerprint"]
    if not (
        isinstance(fingerprint, str)
        and len(fingerprint) <= MAX_FINGERPRINT
        and fingerprint.isascii()
        and fingerprint.isprintable()
    ):
        raise CheckpointError(
            f"Checkpoint field `fingerprint` must be printable ASCII of at most "
            f"{MAX_FINGERPRINT} characters; got {_show(fingerprint)} (in {where})."
        )
    chunks = manifest["chunks"]
    if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS:
        got = f"{len(chunks)} entries" if isinstance(chunks, list) else _show(chunks)
        raise CheckpointError(
            f"Checkpoint field `chunks` must be a list of 1..{MAX_CHUNKS} SHA-256 hex digests; "
            f"got {got} (in {where})."
        )
    digests: list[str] = []
    for i, digest in enumerate(chunks):
        if isinstance(digest, str) and _is_hex_digest(digest):
            digests.append(digest)
        else:
            raise CheckpointError(
                f"Checkpoint field `chunks` entry {i} must be a SHA-256 hex digest; "
                f"got {_show(digest)} (in {where})."
            )
    sizes = manifest["chunk-bytes"]
    if not isinstance(sizes, list) or len(sizes) != len(chunks):
        got = f"{len(sizes)} entries" if isinstance(sizes, list) else _show(sizes)
        raise CheckpointError(
            f"Checkpoint field `chunk-bytes` must be a list of {len(chunks)} sizes, one per "
            f"chunk; got {got} (in {where})."
        )
    ints = [
        _int_field(size, f"`chunk-bytes` entry {i}", 0, max_chunk_bytes, where)
        for i, size in enumerate(sizes)
    ]
    if not _is_hex_digest(manifest["hmac-sha256"]):
        raise CheckpointError(
            f"Checkpoint field `hmac-sha256` must be a hex digest; "
            f"got {_show(manifest['hmac-sha256'])} (in {where})."
        )
    receipts: tuple[str, int] | None = None
    if "receipts" in manifest:
        value = manifest["receipts"]
        if not (
            isinstance(value, list)
            and len(value) == 2
            and _is_hex_digest(value[0])
            and type(value[1]) is int
            and 1 <= value[1] <= MAX_RECEIPTS_BYTES
        ):
            raise CheckpointError(
                f"Checkpoint field `receipts` must be [SHA-256 hex digest, size in "
                f"1..{MAX_RECEIPTS_BYTES}]; got {_show(value)} (in {where})."
            )
        receipts = (str(value[0]), int(value[1]))
    return Fields(round_, examples, length, fingerprint, digests, ints, receipts)


def mac(key: bytes, manifest: dict[str, object]) -> str:
    """HMAC-SHA256 over the canonical JSON of every field but the HMAC itself."""
    fields = {k: v for k, v in manifest.items() if k != "hmac-sha256"}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, body.encode("ascii"), hashlib.sha256).hexdigest()


def parse_state(raw: bytes, where: str) -> dict[str, object]:
    """The JSON object in ``raw``; numbers and constants no field takes are kept as text."""

    def literal(text: str) -> object:
        return _Literal(text)

    def small_int(text: str) -> object:
        return int(text) if len(text) <= 32 else _Literal(text)

    try:
        manifest = json.loads(
            raw.decode("utf-8"), parse_constant=literal, parse_float=literal, parse_int=small_int
        )
    except RecursionError:
        raise CheckpointError(f"{where} nests too deeply to be a checkpoint.") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{where} is not UTF-8 text: {err}") from None
    except ValueError as err:
        raise CheckpointError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where} must hold a JSON object; got {type(manifest).__name__}.")
    return manifest
