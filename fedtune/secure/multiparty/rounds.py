"""One federated round of multiparty CKKS: signed partials, the authenticated global, export.

What travels in a round (docs/multiparty.md, "A round in the federation"):

1. Each client uploads ``Party.encrypt(n_k w_k)`` and ``Party.sign(...)`` (Ed25519 over
   the run, round, name, count, seeds and the upload's hash).
2. The server validates and adds the uploads (the unchanged ``ckks`` codec on the public
   context) and asks a quorum of ``t`` key holders for one partial decryption each of
   that sum (:func:`decryption_round`): the request lists the receipts, so a holder
   checks every signature and ``min-clients`` before it computes anything, and answers
   one request per round (:meth:`Party.partial`). Each answer is *signed*
   (:func:`answer`) by the holder's roster key.
3. The server sends the encrypted sum, the receipts, the quorum and the signed partials
   with the next round's messages (:func:`partials_to_record`). **Every client combines
   itself** (:func:`open_global`): it checks the receipts' signatures, the sum's ``c1``
   against the listed seeds, and every partial's signature against the roster before it
   adds them. The server cannot hand a client a plaintext global of its choosing: it
   cannot sign for an honest holder, and a holder signs only its answer to a request
   whose receipts verify.

What a node sends here, field by field: its name (public), the request digest (a hash of
public data), the partial decryption (smudged: within ``2^-lambda`` statistical distance
of noise that does not depend on the honest encryption noises, :mod:`.params`), and an
Ed25519 signature over those (a deterministic function of them and the node's signing
key, which reveals nothing about the CKKS key shares).

Export (:func:`open_checkpoint`) needs no key: the partials of the checkpointed round are
kept beside it, and anyone with the roster can check and combine them; a second
decryption of the same sum (which would give a second sample of the smudging noise) is
never asked for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from numpy.typing import NDArray

from fedtune import crypto
from fedtune.errors import GlobalRefused
from fedtune.secure.multiparty.protocol import (
    SIGNATURE_BYTES,
    DecryptionRequest,
    PartialDecryption,
    Party,
    Roster,
    _lp,
    check_request,
    combine,
)
from fedtune.secure.verify import C1_MISMATCH, MALFORMED, Receipt

__all__ = [
    "BAD_PARTIAL",
    "NO_PARTIALS",
    "SignedPartial",
    "answer",
    "decryption_round",
    "open_checkpoint",
    "open_global",
    "partials_from_record",
    "partials_to_record",
    "verify_partial",
]

#: A client refuses a global whose partials are not the quorum's signed answers.
BAD_PARTIAL = "global-unverified:bad-partial"
#: A client refuses a multiparty global without partial decryptions.
NO_PARTIALS = "global-unverified:no-partials"

_PARTIAL_DOMAIN = b"fedtune/multiparty/partial/v1\x00"

#: Fields of the ``global`` record added by a multiparty round (beside the receipts).
RECORD_KEYS = (
    "mp-round",
    "mp-quorum",
    "mp-partial-names",
    "mp-partial-signatures",
    "mp-partial-chunks",
)


@dataclass(frozen=True)
class SignedPartial:
    """A key holder's partial decryption and its Ed25519 signature (roster key)."""

    partial: PartialDecryption
    signature: bytes


def _message(roster: Roster, p: PartialDecryption) -> bytes:
    return _PARTIAL_DOMAIN + _lp(
        roster.digest.encode(),
        p.name.encode(),
        p.request,
        *[hashlib.sha256(c).digest() for c in p.chunks],
    )


def answer(party: Party, request: DecryptionRequest, *, min_count: int) -> SignedPartial:
    """``party``'s signed partial decryption of ``request`` (its checks first, once a round)."""
    partial = party.partial(request, min_count=min_count)
    return SignedPartial(partial, party.dealer._signing.sign(_message(party.roster, partial)))


def verify_partial(roster: Roster, signed: SignedPartial) -> bool:
    """Whether ``signed`` is signed by the roster key of the member it names."""
    p = signed.partial
    if not isinstance(p.name, str) or not isinstance(signed.signature, bytes):
        return False
    member = roster.member(p.name)
    if member is None or len(signed.signature) != SIGNATURE_BYTES:
        return False
    if not isinstance(p.request, bytes) or not all(isinstance(c, bytes) for c in p.chunks):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(member.verify_key).verify(
            signed.signature, _message(roster, p)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def decryption_round(
    roster: Roster,
    *,
    server_round: int,
    receipts: Sequence[Receipt],
    num_examples: int,
    quorum: Sequence[str],
    ask: Callable[[str, DecryptionRequest], SignedPartial],
) -> tuple[DecryptionRequest, list[SignedPartial]]:
    """The server's step: one request, one signed partial from each member of ``quorum``.

    ``ask(name, request)`` reaches key holder ``name`` (a message in a federation, a
    direct call in one process). Answers that do not verify are refused here
    (:class:`fedtune.crypto.PayloadError`): the clients would refuse them anyway.
    """
    request = DecryptionRequest(server_round, tuple(receipts), num_examples, tuple(quorum))
    partials = [ask(name, request) for name in quorum]
    for name, signed in zip(quorum, partials, strict=True):
        if signed.partial.name != name or not verify_partial(roster, signed):
            raise crypto.PayloadError(
                f"round {server_round}: the partial decryption from {name!r} is not signed "
                "by its roster key."
            )
    return request, partials


def open_global(
    roster: Roster,
    payload: Mapping[str, object],
    request: DecryptionRequest,
    partials: Sequence[SignedPartial],
    *,
    min_count: int,
) -> NDArray[np.float64]:
    """The decrypted sum a client may use, or :class:`GlobalRefused` with a fixed code.

    Checks, before adding anything: the request's receipts (signatures, distinct names,
    at least ``min_count``, counts), every partial's signature by the quorum member it
    names, and (in :func:`combine`) the sum's ``c1`` against the listed seeds and that
    the partials are exactly the quorum's answers to this request.
    """
    check_request(roster, request, min_count=min_count)
    if not partials:
        raise GlobalRefused(NO_PARTIALS)
    if not all(verify_partial(roster, s) for s in partials):
        raise GlobalRefused(BAD_PARTIAL)
    try:
        return combine(roster, payload, request, [s.partial for s in partials])
    except crypto.PayloadError as err:
        code = C1_MISMATCH if "c1" in str(err) else BAD_PARTIAL
        raise GlobalRefused(code) from err


def partials_to_record(
    request: DecryptionRequest, partials: Sequence[SignedPartial]
) -> dict[str, object]:
    """The round's quorum and signed partials as ``global`` record fields (:data:`RECORD_KEYS`)."""
    return {
        "mp-round": request.server_round,
        "mp-quorum": list(request.quorum),
        "mp-partial-names": [s.partial.name for s in partials],
        "mp-partial-signatures": [s.signature for s in partials],
        "mp-partial-chunks": [c for s in partials for c in s.partial.chunks],
    }


def partials_from_record(
    roster: Roster,
    record: Mapping[str, object],
    *,
    receipts: Sequence[Receipt],
    num_examples: int,
) -> tuple[DecryptionRequest, list[SignedPartial]]:
    """The request and signed partials a ``global`` record carries (:func:`partials_to_record`).

    The request digest each partial answers is not sent: the receiver computes it from
    the receipts, count, round and quorum, and the signatures cover it.

    Raises
    ------
    GlobalRefused
        :data:`NO_PARTIALS` if the fields are absent, :data:`MALFORMED` if ill-typed.
    """
    if not all(k in record for k in RECORD_KEYS):
        raise GlobalRefused(NO_PARTIALS)
    rnd, quorum = record["mp-round"], record["mp-quorum"]
    names, sigs = record["mp-partial-names"], record["mp-partial-signatures"]
    chunks = record["mp-partial-chunks"]
    ok = (
        type(rnd) is int
        and isinstance(quorum, list)
        and all(isinstance(q, str) for q in quorum)
        and isinstance(names, list)
        and all(isinstance(n, str) for n in names)
        and isinstance(sigs, list)
        and all(isinstance(s, bytes) for s in sigs)
        and isinstance(chunks, list)
        and all(isinstance(c, bytes) for c in chunks)
        and len(names) == len(sigs)
        and len(names) > 0
        and len(chunks) % len(names) == 0
    )
    if not ok:
        raise GlobalRefused(MALFORMED)
    assert isinstance(rnd, int) and isinstance(quorum, list) and isinstance(names, list)
    assert isinstance(sigs, list) and isinstance(chunks, list)
    request = DecryptionRequest(rnd, tuple(receipts), num_examples, tuple(quorum))
    digest = request.digest(roster)
    per = len(chunks) // len(names)
    partials = [
        SignedPartial(
            PartialDecryption(name, digest, tuple(chunks[i * per : (i + 1) * per])),
            sig,
        )
        for i, (name, sig) in enumerate(zip(names, sigs, strict=True))
    ]
    return request, partials


def open_checkpoint(
    roster: Roster,
    payload: Mapping[str, object],
    record: Mapping[str, object],
    *,
    receipts: Sequence[Receipt],
    num_examples: int,
    min_count: int,
) -> NDArray[np.float64]:
    """The global adapter ``S / N`` of a checkpointed round from its kept signed partials."""
    request, partials = partials_from_record(
        roster, record, receipts=receipts, num_examples=num_examples
    )
    return open_global(roster, payload, request, partials, min_count=min_count) / num_examples
