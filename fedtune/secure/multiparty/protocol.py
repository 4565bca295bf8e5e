"""Key ceremony, signed uploads, partial decryption and combination (docs/multiparty.md).

Who holds what
--------------
* Each data owner ``k`` (a *party*) has its own CKKS secret key ``t_k``, a SEAL key made
  by SEAL, with which it encrypts its uploads exactly as shared-key CKKS does
  (:func:`fedtune.crypto.encrypt_vector`: symmetric, *seeded*, ``c1_k = Expand(seed_k)``).
* ``t_k`` is Shamir-shared (threshold ``t`` of the ``n`` parties) in NTT form, modulo each
  data prime: party ``j`` holds ``t_k(x_j)`` for every ``k``. Fewer than ``t`` shares say
  nothing about ``t_k``; no party but ``k`` ever holds ``t_k``, and ``t_k`` decrypts
  nothing but ``k``'s own uploads.
* Each party signs its uploads with its own Ed25519 key (public half in the roster), so
  neither the server nor another party can make an upload pass for ``k``'s.
* The server holds the public context (parameters and the roster's digest), the uploads
  and their sum; it combines the partial decryptions and so sees the sum (like secure
  aggregation; under DP the sum is the release the ledgers account for).

Decrypting the sum of uploads ``S`` (one request per round)::

    C0 = sum_{k in S} c0_k,      c0_k = -c1_k t_k + m_k + e_k        (SEAL)
    d_j = lambda_j(T) sum_{k in S} c1_k t_k(x_j) + u_j              (party j in quorum T)
    C0 + sum_{j in T} d_j = sum_{k in S} (m_k + e_k) + sum_j u_j     (Lagrange at 0)

``u_j`` is party ``j``'s smudging noise (:class:`~.params.MultipartyParams`). ``c1_k`` is
recomputed by each party from the listed *seeds*, so it cannot be chosen by the server or
a malicious party (a hash output): the partial decryption of a chosen, structured ``c1``
(which would read the key, docs/multiparty.md "Why not a collective public key") cannot be
asked for. A party answers one request per round; the same request again gets the same
bytes back (fresh noise on the same sum would average away).

The threshold decryption follows Mouchet, Troncoso-Pastoriza, Bossuat and Hubaux,
"Multiparty Homomorphic Encryption from Ring-Learning-with-Errors", PoPETs 2021(4)
(collective key switching to the zero key, with smudging noise), and for t-of-n Shamir
shares Mouchet, Bertrand and Hubaux, "An Efficient Threshold Access-Structure for
RLWE-Based Multiparty Homomorphic Encryption", J. Cryptology 2023 (eprint 2022/780),
applied to per-party symmetric keys instead of one collective key.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from numpy.typing import NDArray

from fedtune import crypto
from fedtune.crypto import receipts
from fedtune.crypto._seal import expected_version, scratch_dir
from fedtune.crypto.context import CkksContext, make_secret_context
from fedtune.crypto.key_format import KeyLayout, parse_secret_key
from fedtune.errors import KeygenAborted
from fedtune.secure.multiparty import ring
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.verify import (
    BAD_TAGS,
    DUPLICATE_NAME,
    EXAMPLES_MISMATCH,
    MALFORMED,
    REPLACED,
    TOO_FEW,
    GlobalRefused,
    Receipt,
)

__all__ = [
    "EXHAUSTED",
    "NOT_IN_QUORUM",
    "QUORUM",
    "UNKNOWN_NAME",
    "DecryptionRequest",
    "Dealer",
    "KeygenAborted",
    "Member",
    "PartialDecryption",
    "Party",
    "Roster",
    "SharePacket",
    "ceremony",
    "check_request",
    "combine",
    "make_receipt",
    "public_context",
]

UNKNOWN_NAME = "partial-refused:unknown-name"
QUORUM = "partial-refused:bad-quorum"
NOT_IN_QUORUM = "partial-refused:not-in-quorum"
EXHAUSTED = "partial-refused:rounds-exhausted"

_SHARE_DOMAIN = b"fedtune/multiparty/share/v1\x00"
_ROSTER_DOMAIN = b"fedtune/multiparty/roster/v1\x00"
_UPLOAD_DOMAIN = b"fedtune/multiparty/upload/v1\x00"
_REQUEST_DOMAIN = b"fedtune/multiparty/request/v1\x00"
SIGNATURE_BYTES = 64


def _lp(*fields: bytes) -> bytes:
    """Length-prefixed concatenation (unambiguous)."""
    return b"".join(struct.pack("<Q", len(f)) + f for f in fields)


# ----- roster -------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One party's announcement (phase 1 of the ceremony): all of it is public.

    Attributes
    ----------
    name : str
        The party's name (node id).
    x : int
        Its Shamir abscissa, ``1..n``.
    verify_key : bytes
        Raw Ed25519 public key its uploads are signed with.
    commitments : Mapping[str, bytes]
        Recipient name -> SHA-256 commitment to the share of ``t_name`` it deals to them
        (hiding: a fresh 32-byte nonce enters each).
    """

    name: str
    x: int
    verify_key: bytes
    commitments: Mapping[str, bytes]

    def encode(self) -> bytes:
        items = sorted(self.commitments.items())
        return _lp(
            self.name.encode(),
            str(self.x).encode(),
            self.verify_key,
            *[_lp(k.encode(), v) for k, v in items],
        )


@dataclass(frozen=True)
class Roster:
    """Every announcement of a run, the threshold and the parameters: the public key material."""

    run: str
    threshold: int
    params: MultipartyParams
    members: tuple[Member, ...]

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of everything in the roster; the run's ``key_id``."""
        p = self.params
        h = hashlib.sha256(_ROSTER_DOMAIN)
        h.update(
            _lp(
                self.run.encode(),
                str(self.threshold).encode(),
                repr(
                    (
                        p.ckks.poly_modulus_degree,
                        p.ckks.coeff_mod_bit_sizes,
                        p.ckks.global_scale_bits,
                        p.security_bits,
                        p.max_rounds,
                        p.max_uploads,
                    )
                ).encode(),
            )
        )
        for m in sorted(self.members, key=lambda m: m.name):
            h.update(_lp(m.encode()))
        return h.hexdigest()

    def member(self, name: str) -> Member | None:
        for m in self.members:
            if m.name == name:
                return m
        return None


def public_context(roster: Roster) -> CkksContext:
    """The server's context: parameters and ``key_id`` = the roster digest; no key."""
    return CkksContext(params=roster.params.ckks, key_id=roster.digest, secret_key_bytes=None)


# ----- the ceremony -------------------------------------------------------------------


@dataclass(frozen=True)
class SharePacket:
    """Phase 2: dealer -> recipient, privately (an encrypted channel in deployment)."""

    dealer: str
    recipient: str
    nonce: bytes
    share: bytes


def _commitment(run: str, dealer: str, recipient: str, nonce: bytes, share: bytes) -> bytes:
    return hashlib.sha256(
        _SHARE_DOMAIN + _lp(run.encode(), dealer.encode(), recipient.encode(), nonce, share)
    ).digest()


def _key_ntt(ctx: CkksContext) -> ring.Poly:
    """The data-level residues of ``ctx``'s SEAL secret key (NTT form), ``(L, N)``."""
    sc = ctx._seal_context
    layout = KeyLayout(
        version=expected_version(),
        parms_id=tuple(int(v) for v in sc.key_parms_id()),  # type: ignore[arg-type]
        poly_modulus_degree=ctx.params.poly_modulus_degree,
        primes=ctx.primes,
    )
    raw = parse_secret_key(ctx._secret_key_bytes or b"", layout)
    n = ctx.params.poly_modulus_degree
    offset = len(raw) - 8 * n * len(ctx.primes)
    key = np.frombuffer(raw, dtype="<u8", offset=offset).reshape(len(ctx.primes), n)
    return key[: ctx.params.data_prime_count].copy()


class Dealer:
    """A party during the ceremony: its upload key, signing key, and the shares it deals."""

    def __init__(self, name: str, *, run: str, params: MultipartyParams) -> None:
        if not name or len(name) > 64:
            raise ValueError(f"a party name should have 1 to 64 characters, got {name!r}.")
        self.name = name
        self.run = run
        self.params = params
        self.context = make_secret_context(params.ckks)  # SEAL's CSPRNG
        self._signing = Ed25519PrivateKey.generate()
        self._packets: dict[str, SharePacket] = {}
        self.announcement: Member | None = None

    def announce(self, abscissae: Mapping[str, int], *, threshold: int) -> Member:
        """Deal Shamir shares of this party's key to ``abscissae`` (name -> x); commit to each."""
        if self.name not in abscissae:
            raise ValueError(f"{self.name!r} is not among the parties {sorted(abscissae)}.")
        xs = list(abscissae.values())
        if len(set(xs)) != len(xs) or not all(1 <= x <= len(xs) for x in xs):
            raise ValueError(f"abscissae must be 1..n, distinct; got {abscissae}.")
        if not len(xs) < 2 * threshold <= 2 * len(xs):
            raise ValueError(
                f"`threshold` must lie in ({len(xs) / 2:g}, {len(xs)}] (more than half of the "
                f"{len(xs)} key holders, so that two different sums of one round need "
                f"2t - n >= 1 colluding key holders); got {threshold}."
            )
        layout = self.context.layout
        secret = _key_ntt(self.context)
        names = list(abscissae)
        shares = ring.shamir_shares(
            layout, secret, xs=[abscissae[n] for n in names], threshold=threshold
        )
        commitments = {}
        for recipient, share in zip(names, shares, strict=True):
            nonce = os.urandom(32)
            data = np.ascontiguousarray(share, dtype="<u8").tobytes()
            self._packets[recipient] = SharePacket(self.name, recipient, nonce, data)
            commitments[recipient] = _commitment(self.run, self.name, recipient, nonce, data)
        vk = self._signing.public_key().public_bytes_raw()
        self.announcement = Member(self.name, abscissae[self.name], vk, commitments)
        return self.announcement

    def packet_for(self, recipient: str) -> SharePacket:
        """Phase 2, after every announcement is in the roster."""
        return self._packets[recipient]

    def finish(self, roster: Roster, packets: Iterable[SharePacket]) -> Party:
        """Check the roster and every received share against its commitment; become a party.

        Raises
        ------
        KeygenAborted
            Naming the dealer whose share does not open its commitment, or if the roster
            does not hold this party's own announcement unchanged.
        """
        if roster.run != self.run or roster.member(self.name) != self.announcement:
            raise KeygenAborted(
                f"{self.name}: the roster does not hold this party's own announcement "
                "unchanged (another run, or the server altered it); keygen aborted, start "
                "it again."
            )
        layout = self.context.layout
        got: dict[str, ring.Poly] = {}
        for p in packets:
            dealer = roster.member(p.dealer)
            if p.recipient != self.name or dealer is None or p.dealer in got:
                raise KeygenAborted(
                    f"{self.name}: a share from {p.dealer!r} to {p.recipient!r} was not "
                    "expected (unknown dealer, another recipient or twice); keygen aborted."
                )
            expected = dealer.commitments.get(self.name, b"")
            opened = _commitment(self.run, p.dealer, self.name, p.nonce, p.share)
            if not hmac.compare_digest(opened, expected):
                raise KeygenAborted(
                    f"{self.name}: the share dealt by {p.dealer!r} does not match the "
                    "commitment it announced; keygen aborted (that dealer, or the channel, "
                    "misbehaved)."
                )
            n = layout.poly_modulus_degree
            arr = np.frombuffer(p.share, dtype="<u8")
            if arr.size != len(layout.primes) * n:
                raise KeygenAborted(f"{self.name}: the share from {p.dealer!r} has the wrong size.")
            share = arr.reshape(len(layout.primes), n).copy()
            if (share >= np.array(layout.primes, dtype=np.uint64)[:, None]).any():
                raise KeygenAborted(f"{self.name}: the share from {p.dealer!r} is out of range.")
            got[p.dealer] = share
        missing = sorted({m.name for m in roster.members} - set(got))
        if missing:
            raise KeygenAborted(f"{self.name}: no share from {missing}; keygen aborted.")
        return Party(self, roster, got)


def ceremony(
    names: Sequence[str], *, run: str, threshold: int | None = None, params: MultipartyParams
) -> tuple[Roster, list[Party]]:
    """The whole ceremony in one process (simulation, tests): announce, roster, deal, check.

    In deployment the same three steps run over the federation (docs/multiparty.md):
    the server only relays announcements (public) and share packets (encrypted to
    their recipient).
    """
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"party names must be distinct and at least one, got {list(names)}.")
    t = len(names) if threshold is None else threshold
    dealers = [Dealer(n, run=run, params=params) for n in names]
    abscissae = {n: i + 1 for i, n in enumerate(names)}
    members = tuple(d.announce(abscissae, threshold=t) for d in dealers)
    roster = Roster(run=run, threshold=t, params=params, members=members)
    parties = [d.finish(roster, [e.packet_for(d.name) for e in dealers]) for d in dealers]
    return roster, parties


# ----- uploads ------------------------------------------------------------------------


def _upload_message(
    roster: Roster, *, server_round: int, name: str, num_examples: int, seeds: bytes, digest: bytes
) -> bytes:
    return _UPLOAD_DOMAIN + _lp(
        roster.digest.encode(),
        str(server_round).encode(),
        name.encode(),
        str(num_examples).encode(),
        seeds,
        digest,
    )


def make_receipt(
    public: CkksContext,
    payload: Mapping[str, object],
    signature: bytes,
    *,
    name: str,
    num_examples: int,
) -> Receipt:
    """The server's receipt of a validated upload (the signature is checked by the parties)."""
    enc = crypto.EncryptedVector.from_wire(dict(payload))
    return Receipt(
        name=name,
        num_examples=num_examples,
        seeds=receipts.upload_seeds(public, enc),
        digest=receipts.upload_digest(enc),
        tag=signature,
    )


# ----- decryption ---------------------------------------------------------------------


@dataclass(frozen=True)
class DecryptionRequest:
    """What the server asks every party of ``quorum`` to partially decrypt in one round."""

    server_round: int
    receipts: tuple[Receipt, ...]
    num_examples: int
    quorum: tuple[str, ...]

    def digest(self, roster: Roster) -> bytes:
        h = hashlib.sha256(_REQUEST_DOMAIN)
        h.update(_lp(roster.digest.encode(), str(self.server_round).encode()))
        h.update(_lp(str(self.num_examples).encode(), *[q.encode() for q in self.quorum]))
        for r in self.receipts:
            h.update(_lp(r.name.encode(), str(r.num_examples).encode(), r.seeds, r.digest, r.tag))
        return h.digest()


@dataclass(frozen=True)
class PartialDecryption:
    """Party ``name``'s share of the decryption of one request: one polynomial per chunk."""

    name: str
    request: bytes
    chunks: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass
class Party:
    """A key holder after the ceremony: its upload key, its shares, its round log."""

    dealer: Dealer
    roster: Roster
    shares: dict[str, ring.Poly]
    #: round -> (request digest, the partial given): one per round, the same one again.
    used: dict[int, tuple[bytes, PartialDecryption]] = field(default_factory=dict)
    _shoup: dict[str, ring.Poly] = field(default_factory=dict, repr=False)

    def _share_shoup(self, dealer: str) -> ring.Poly:
        if dealer not in self._shoup:
            self._shoup[dealer] = ring.shoup(self.public.layout, self.shares[dealer])
        return self._shoup[dealer]

    @property
    def name(self) -> str:
        return self.dealer.name

    @property
    def x(self) -> int:
        member = self.roster.member(self.name)
        assert member is not None
        return member.x

    @functools.cached_property
    def public(self) -> CkksContext:
        return public_context(self.roster)

    # -- as an uploader --

    def encrypt(self, vector: NDArray[np.floating]) -> dict[str, object]:
        """``vector`` under this party's own key, labelled with the run's fingerprint."""
        enc = crypto.encrypt_vector(self.dealer.context, np.asarray(vector, dtype=np.float64))
        relabelled = crypto.EncryptedVector(
            chunks=enc.chunks, length=enc.length, fingerprint=self.public.fingerprint
        )
        return relabelled.to_wire()

    def sign(self, payload: Mapping[str, object], *, server_round: int, num_examples: int) -> bytes:
        """Ed25519 signature binding the upload to this party, the run and the round."""
        public = self.public
        enc = crypto.EncryptedVector.from_wire(dict(payload))
        message = _upload_message(
            self.roster,
            server_round=server_round,
            name=self.name,
            num_examples=num_examples,
            seeds=receipts.upload_seeds(public, enc),
            digest=receipts.upload_digest(enc),
        )
        return self.dealer._signing.sign(message)

    # -- as a key holder --

    def check(self, request: DecryptionRequest, *, min_count: int) -> None:
        """The checks before any partial decryption (fixed codes, :class:`GlobalRefused`)."""
        check_request(self.roster, request, min_count=min_count, member=self.name)

    def partial(self, request: DecryptionRequest, *, min_count: int) -> PartialDecryption:
        """This party's partial decryption of ``request``'s sum, once per round.

        Raises
        ------
        GlobalRefused
            With a fixed code, before anything is computed: the checks of
            :meth:`check`, or :data:`~fedtune.secure.verify.REPLACED` for a second,
            different request in a round this party already answered.
        """
        self.check(request, min_count=min_count)
        digest = request.digest(self.roster)
        previous = self.used.get(request.server_round)
        if previous is not None:
            if not hmac.compare_digest(previous[0], digest):
                raise GlobalRefused(REPLACED)
            return previous[1]  # the same bytes: no second sample of the noise
        if len(self.used) >= self.roster.params.max_rounds:
            raise GlobalRefused(EXHAUSTED)
        public = self.public
        layout = public.layout
        lam = ring.lagrange_at_zero(
            layout,
            self.x,
            [self.roster.member(q).x for q in request.quorum],  # type: ignore[union-attr]
        )
        n_chunks = len(request.receipts[0].seeds) // receipts.SEED_BYTES
        bits = self.roster.params.smudging_bits
        noise = ring.smudging_ntt(public, bits=bits, count=n_chunks)
        out = []
        with scratch_dir() as tmp:
            for i in range(n_chunks):
                acc = np.zeros((len(layout.primes), layout.poly_modulus_degree), np.uint64)
                for r in request.receipts:
                    seed = r.seeds[i * receipts.SEED_BYTES : (i + 1) * receipts.SEED_BYTES]
                    try:
                        c1 = receipts._expand(public, seed, tmp)
                    except crypto.PayloadError as err:
                        raise GlobalRefused(MALFORMED) from err
                    term = ring.mul_shoup(
                        layout, c1, self.shares[r.name], self._share_shoup(r.name)
                    )
                    acc = ring.add(layout, acc, term)
                d = ring.add(layout, ring.scale(layout, acc, lam), noise[i])
                out.append(ring.pack_partial(public, d, smudging_bits=bits))
        result = PartialDecryption(self.name, digest, tuple(out))
        self.used[request.server_round] = (digest, result)
        return result


def check_request(
    roster: Roster, request: DecryptionRequest, *, min_count: int, member: str | None = None
) -> None:
    """The checks of a decryption request (fixed codes, :class:`GlobalRefused`).

    A key holder (``member``) runs them before its partial decryption; every party runs
    them (``member=None``) before it uses a combined global (:mod:`.rounds`).
    """
    items = request.receipts
    if not isinstance(items, tuple) or not items or len(items) > roster.params.max_uploads:
        raise GlobalRefused(MALFORMED)
    well_formed = (
        type(request.server_round) is int
        and type(request.num_examples) is int
        and isinstance(request.quorum, tuple)
        and all(isinstance(q, str) for q in request.quorum)
        and all(
            isinstance(r, Receipt)
            and isinstance(r.name, str)
            and type(r.num_examples) is int
            and r.num_examples >= 1
            and isinstance(r.seeds, bytes)
            and isinstance(r.digest, bytes)
            and len(r.digest) == 32
            and isinstance(r.tag, bytes)
            and len(r.tag) == SIGNATURE_BYTES
            for r in items
        )
    )
    if not well_formed:
        raise GlobalRefused(MALFORMED)
    if not 1 <= request.server_round <= roster.params.max_rounds:
        raise GlobalRefused(EXHAUSTED)
    quorum = request.quorum
    if len(set(quorum)) != len(quorum) or len(quorum) < roster.threshold:
        raise GlobalRefused(QUORUM)
    if any(roster.member(q) is None for q in quorum):
        raise GlobalRefused(QUORUM)
    if member is not None and member not in quorum:
        raise GlobalRefused(NOT_IN_QUORUM)
    bad = []
    for i, r in enumerate(items):
        uploader = roster.member(r.name)
        if uploader is None:
            raise GlobalRefused(UNKNOWN_NAME)
        message = _upload_message(
            roster,
            server_round=request.server_round,
            name=r.name,
            num_examples=r.num_examples,
            seeds=r.seeds,
            digest=r.digest,
        )
        try:
            Ed25519PublicKey.from_public_bytes(uploader.verify_key).verify(r.tag, message)
        except (InvalidSignature, ValueError):
            bad.append(i)
    if bad:
        raise GlobalRefused(f"{BAD_TAGS}:{','.join(map(str, bad))}")
    if len({r.name for r in items}) != len(items):
        raise GlobalRefused(DUPLICATE_NAME)
    if len(items) < min_count:
        raise GlobalRefused(TOO_FEW)
    if sum(r.num_examples for r in items) != request.num_examples:
        raise GlobalRefused(EXAMPLES_MISMATCH)
    chunks = {len(r.seeds) for r in items}
    if len(chunks) != 1 or next(iter(chunks)) % receipts.SEED_BYTES:
        raise GlobalRefused(MALFORMED)


def _parse_partial(
    public: CkksContext, p: PartialDecryption, chunks: int, *, smudging_bits: int
) -> list[ring.Poly]:
    if len(p.chunks) != chunks:
        raise crypto.PayloadError(
            f"partial decryption of {p.name!r} has {len(p.chunks)} chunks; expected {chunks}."
        )
    out = []
    for i, c in enumerate(p.chunks):
        try:
            if not isinstance(c, bytes):
                raise ValueError(f"expected bytes, got {type(c).__name__}")
            out.append(ring.unpack_partial(public, c, smudging_bits=smudging_bits))
        except ValueError as err:
            raise crypto.PayloadError(
                f"partial decryption of {p.name!r}, chunk {i}: {err}"
            ) from err
    return out


def combine(
    roster: Roster,
    payload: Mapping[str, object],
    request: DecryptionRequest,
    partials: Sequence[PartialDecryption],
) -> NDArray[np.float64]:
    """The decrypted sum: ``C0 + sum_j d_j``, CKKS-decoded (what the combiner computes).

    ``payload`` is the server's sum of the listed uploads (validated here, and its
    ``c1`` must be the sum of the listed seeds' expansions, as for shared-key CKKS).

    Raises
    ------
    fedtune.crypto.PayloadError
        If the sum or a partial does not parse, or the partials are not exactly the
        quorum's answers to this request.
    """
    public = public_context(roster)
    length = payload.get("length") if isinstance(payload, Mapping) else None
    if type(length) is not int:
        raise crypto.PayloadError("the sum's `length` must be an int.")
    enc = crypto.validate_encrypted(public, dict(payload), length=length, aggregate=True)
    if not receipts.c1_matches(public, enc, [r.seeds for r in request.receipts]):
        raise crypto.PayloadError("the sum's c1 is not the sum of the listed uploads' seeds.")
    digest = request.digest(roster)
    if sorted(p.name for p in partials) != sorted(request.quorum) or any(
        not hmac.compare_digest(p.request, digest) for p in partials
    ):
        raise crypto.PayloadError(
            "the partial decryptions are not exactly the quorum's answers to this request."
        )
    layout = public.layout
    values = np.empty(len(enc.chunks) * public.params.values_per_chunk, dtype=np.float64)
    bits = roster.params.smudging_bits
    parsed = [_parse_partial(public, p, len(enc.chunks), smudging_bits=bits) for p in partials]
    with scratch_dir() as tmp:
        for i, chunk in enumerate(enc.chunks):
            c0 = crypto.payload.full_coefficients(
                public, chunk, field=f"chunks[{i}]", directory=tmp
            )[0]
            total = ring.add(layout, c0, *[p[i] for p in parsed])
            lo = i * public.params.values_per_chunk
            values[lo : lo + public.params.values_per_chunk] = ring.decode_plaintext(public, total)
    return values[:length]
