"""The key ceremony over a federation: each party's step from its own state and public messages.

:func:`~fedtune.secure.multiparty.protocol.ceremony` runs every party in one process.
Deployed, each party is a node worker and the server only relays (docs/multiparty.md,
"The key ceremony"); this module is both sides' arithmetic, with no Flower in it:

0. ``hello``: the party makes a fresh X25519 key for this ceremony and sends its public
   half with its name (:class:`CeremonyParty`).
1. ``announce``: the server assigns the abscissae (names sorted, ``x = 1..n``) and the
   threshold; each party makes its SEAL key, its Ed25519 key and its Shamir shares and
   answers with its :class:`~.protocol.Member` (verification key, commitments).
2. ``roster``: the server sends the roster and every party's X25519 key; each party checks
   that its own announcement and key are in it unchanged and signs the
   :func:`transcript_digest` (roster digest and X25519 keys) with its Ed25519 key.
3. ``deal``: the server sends every signature; each party checks all of them under the
   roster's verification keys (so all parties saw the same roster and keys) and seals the
   share for each recipient to that recipient's X25519 key (:func:`seal_share`).
4. ``receive``: the server routes the sealed shares (it sees only ciphertexts); the
   recipient opens each (:func:`open_share`), checks it against the dealer's commitment
   and becomes a :class:`~.protocol.Party`.

Sealing is ECIES-style: a fresh X25519 key per share, HKDF-SHA256 over the shared secret
bound to the run, dealer, recipient and both public keys, and ChaCha20-Poly1305 with the
same binding as associated data. A share sealed for one recipient or run opens nowhere
else; a share the server alters fails the tag, and one a dealer alters fails its
commitment (both abort the ceremony, naming the dealer).

What the server learns: names, X25519 and Ed25519 public keys, commitments (hiding: each
has a fresh 32-byte nonce), signatures, ciphertexts. Every party signs the same roster,
so the server cannot show two parties different rosters; that it adds no parties of its
own (sybils) is the deployed node's check against its pinned peers before step 2
(:func:`fedtune.identity.check_roster`, docs/deployment.md, "Multiparty keys").
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.errors import KeygenAborted
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.multiparty.protocol import (
    SIGNATURE_BYTES,
    Dealer,
    Member,
    Party,
    Roster,
    SharePacket,
)

__all__ = [
    "KEX_BYTES",
    "MAX_NAME",
    "MAX_PARTIES",
    "MAX_RUN",
    "CeremonyParty",
    "member_from_record",
    "member_to_record",
    "open_share",
    "seal_share",
    "sealed_bytes",
    "transcript_digest",
]

#: The most key holders one ceremony takes (each holds one share per party: 128 KiB at
#: N = 8192, and deals as many sealed shares).
MAX_PARTIES = 64
#: A party's name (node name) and the ceremony's run label, in characters.
MAX_NAME = 64
MAX_RUN = 256
KEX_BYTES = 32
_NONCE_BYTES = 32
_TAG_BYTES = 16
_SEAL_DOMAIN = b"fedtune/multiparty/seal/v1\x00"
_TRANSCRIPT_DOMAIN = b"fedtune/multiparty/transcript/v1\x00"


def _lp(*fields: bytes) -> bytes:
    return b"".join(struct.pack("<Q", len(f)) + f for f in fields)


def valid_name(name: object) -> bool:
    """A party name: 1..64 printable ASCII characters, no separators a path could use."""
    return (
        isinstance(name, str)
        and 1 <= len(name) <= MAX_NAME
        and name.isascii()
        and name.isprintable()
        and not any(c in name for c in "/\\ \t")
        and name not in (".", "..")
    )


def transcript_digest(roster: Roster, kex_keys: Mapping[str, bytes]) -> bytes:
    """What every party signs in step 2: the roster's digest and every X25519 key."""
    items = sorted(kex_keys.items())
    return hashlib.sha256(
        _TRANSCRIPT_DOMAIN + _lp(roster.digest.encode(), *[_lp(n.encode(), k) for n, k in items])
    ).digest()


def sealed_bytes(params: MultipartyParams) -> int:
    """The exact size of one sealed share: ephemeral key, nonce and share, tag."""
    share = params.ckks.data_prime_count * params.ckks.poly_modulus_degree * 8
    return KEX_BYTES + _NONCE_BYTES + share + _TAG_BYTES


def _seal_key(
    shared: bytes, *, run: str, dealer: str, recipient: str, eph: bytes, static: bytes
) -> tuple[ChaCha20Poly1305, bytes]:
    """The AEAD key of one sealed share and its associated data (run, dealer, recipient)."""
    aad = _SEAL_DOMAIN + _lp(run.encode(), dealer.encode(), recipient.encode())
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=aad + _lp(eph, static))
    return ChaCha20Poly1305(key.derive(shared)), aad


def seal_share(packet: SharePacket, *, run: str, recipient_key: bytes) -> bytes:
    """``packet`` (nonce and share) sealed to the recipient's X25519 key, bound to the run."""
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient_key))
    aead, aad = _seal_key(
        shared,
        run=run,
        dealer=packet.dealer,
        recipient=packet.recipient,
        eph=eph_pub,
        static=recipient_key,
    )
    # A fresh key per share (the ephemeral X25519 key), so a zero nonce is used once.
    return eph_pub + aead.encrypt(bytes(12), packet.nonce + packet.share, aad)


def open_share(
    sealed: bytes,
    *,
    run: str,
    dealer: str,
    recipient: str,
    key: X25519PrivateKey,
    params: MultipartyParams,
) -> SharePacket:
    """The packet ``dealer`` sealed to ``recipient`` (``key`` its X25519 private key).

    Raises
    ------
    KeygenAborted
        Naming the dealer, if the size is not exactly :func:`sealed_bytes` or the
        ciphertext does not open (another run, recipient or key, or altered on the way).
    """
    if not isinstance(sealed, bytes) or len(sealed) != sealed_bytes(params):
        raise KeygenAborted(
            f"{recipient}: the sealed share from {dealer!r} is not {sealed_bytes(params)} "
            "bytes; keygen aborted."
        )
    eph_pub = sealed[:KEX_BYTES]
    static = key.public_key().public_bytes_raw()
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        aead, aad = _seal_key(
            shared, run=run, dealer=dealer, recipient=recipient, eph=eph_pub, static=static
        )
        plain = aead.decrypt(bytes(12), sealed[KEX_BYTES:], aad)
    except (InvalidTag, ValueError) as err:
        raise KeygenAborted(
            f"{recipient}: the sealed share from {dealer!r} does not open (another run or "
            "recipient, or altered on the way); keygen aborted."
        ) from err
    return SharePacket(dealer, recipient, plain[:_NONCE_BYTES], plain[_NONCE_BYTES:])


# ----- announcements on the wire -------------------------------------------------------


def member_to_record(member: Member) -> dict[str, object]:
    """A :class:`Member` as the fields of a Flower ``ConfigRecord`` (public)."""
    names = sorted(member.commitments)
    return {
        "name": member.name,
        "x": member.x,
        "verify-key": member.verify_key,
        "commitment-names": names,
        "commitments": [member.commitments[n] for n in names],
    }


def member_from_record(record: Mapping[str, object], *, recipients: Sequence[str]) -> Member:
    """Parse an announcement strictly: types, sizes, and exactly one commitment a recipient.

    Raises
    ------
    ValueError
        Naming the field that is wrong (the server's log; a node never parses these).
    """
    name, x, vk = record.get("name"), record.get("x"), record.get("verify-key")
    names, commitments = record.get("commitment-names"), record.get("commitments")
    if not valid_name(name):
        raise ValueError("`name` is not a party name")
    if type(x) is not int or not 1 <= x <= MAX_PARTIES:
        raise ValueError("`x` is not an abscissa in 1..64")
    if not isinstance(vk, bytes) or len(vk) != 32:
        raise ValueError("`verify-key` is not 32 bytes")
    if (
        not isinstance(names, list)
        or not isinstance(commitments, list)
        or len(names) != len(commitments)
        or sorted(str(n) for n in names) != sorted(recipients)
        or len(set(map(str, names))) != len(names)
        or not all(isinstance(c, bytes) and len(c) == 32 for c in commitments)
    ):
        raise ValueError("`commitments` are not one 32-byte commitment per party")
    assert isinstance(name, str)
    return Member(name, x, vk, {str(n): bytes(c) for n, c in zip(names, commitments, strict=True)})


# ----- one party's side ---------------------------------------------------------------


class CeremonyParty:
    """One party during a deployed ceremony: its secrets stay here, its answers are public.

    Each method is one step; it checks what the server sent before it answers and raises
    :class:`~fedtune.errors.KeygenAborted` (the roster is not the one it announced in, a
    signature or a sealed share does not verify) or ``ValueError`` (a malformed message).
    """

    def __init__(self, name: str, *, params: MultipartyParams) -> None:
        if not valid_name(name):
            raise ValueError(
                f"a party name should be 1 to {MAX_NAME} printable ASCII characters "
                f"without '/', '\\' or spaces; got {name!r}."
            )
        self.name = name
        self.params = params
        self._kex = X25519PrivateKey.generate()
        self.dealer: Dealer | None = None
        self.threshold = 0
        self.abscissae: dict[str, int] = {}
        self.roster: Roster | None = None
        self.kex_keys: dict[str, bytes] = {}
        self._dealt = False

    @property
    def kex_public(self) -> bytes:
        """Step 0: this ceremony's X25519 public key (the shares for this party seal to it)."""
        return self._kex.public_key().public_bytes_raw()

    def announce(self, *, run: str, abscissae: Mapping[str, int], threshold: int) -> Member:
        """Step 1: make this party's keys and shares; commit to each share."""
        if self.dealer is not None:
            raise KeygenAborted(f"{self.name}: asked to announce twice in one ceremony.")
        if not isinstance(run, str) or not 1 <= len(run) <= MAX_RUN or not run.isprintable():
            raise ValueError("the ceremony's run label is not 1..256 printable characters.")
        if not 1 <= len(abscissae) <= MAX_PARTIES or not all(map(valid_name, abscissae)):
            raise ValueError(f"the party list is not 1..{MAX_PARTIES} valid names.")
        if any(type(x) is not int for x in abscissae.values()) or type(threshold) is not int:
            raise ValueError("abscissae and threshold must be integers.")
        dealer = Dealer(self.name, run=run, params=self.params)
        member = dealer.announce(dict(abscissae), threshold=threshold)  # checks x and t
        self.dealer, self.threshold, self.abscissae = dealer, threshold, dict(abscissae)
        return member

    def sign_roster(self, roster: Roster, kex_keys: Mapping[str, bytes]) -> bytes:
        """Step 2: check the roster holds this party unchanged; sign it with the X25519 keys."""
        dealer = self.dealer
        if dealer is None or self.roster is not None:
            raise KeygenAborted(f"{self.name}: a roster before an announcement, or twice.")
        names = sorted(m.name for m in roster.members)
        if (
            roster.run != dealer.run
            or roster.threshold != self.threshold
            or roster.params != self.params
            or roster.member(self.name) != dealer.announcement
            or {m.name: m.x for m in roster.members} != self.abscissae
            or len(set(names)) != len(names)
            or sorted(kex_keys) != names
            or any(len(k) != KEX_BYTES for k in kex_keys.values())
            or kex_keys.get(self.name) != self.kex_public
        ):
            raise KeygenAborted(
                f"{self.name}: the roster does not hold this party's own announcement, "
                "threshold, parameters and key unchanged (another run, or the server "
                "altered it); keygen aborted, start it again."
            )
        self.roster, self.kex_keys = roster, dict(kex_keys)
        return dealer._signing.sign(transcript_digest(roster, self.kex_keys))

    def deal(self, signatures: Mapping[str, bytes]) -> dict[str, bytes]:
        """Step 3: every party signed the same roster and keys; seal each recipient's share."""
        dealer, roster = self.dealer, self.roster
        if dealer is None or roster is None:
            raise KeygenAborted(f"{self.name}: asked to deal before the roster was signed.")
        digest = transcript_digest(roster, self.kex_keys)
        if sorted(signatures) != sorted(m.name for m in roster.members):
            raise KeygenAborted(f"{self.name}: not one roster signature per party; aborted.")
        for m in roster.members:
            sig = signatures[m.name]
            try:
                if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
                    raise ValueError("size")
                Ed25519PublicKey.from_public_bytes(m.verify_key).verify(sig, digest)
            except (InvalidSignature, ValueError) as err:
                raise KeygenAborted(
                    f"{self.name}: {m.name!r} did not sign the roster this party signed "
                    "(the server showed parties different rosters); keygen aborted."
                ) from err
        self._dealt = True
        return {
            m.name: seal_share(
                dealer.packet_for(m.name), run=roster.run, recipient_key=self.kex_keys[m.name]
            )
            for m in roster.members
            if m.name != self.name
        }

    def finish(self, sealed: Mapping[str, bytes]) -> Party:
        """Step 4: open the share from every other dealer, check its commitment, be a party."""
        dealer, roster = self.dealer, self.roster
        if dealer is None or roster is None or not self._dealt:
            raise KeygenAborted(f"{self.name}: shares arrived before this party dealt.")
        others = sorted(m.name for m in roster.members if m.name != self.name)
        if sorted(sealed) != others:
            raise KeygenAborted(f"{self.name}: not one sealed share per other dealer; aborted.")
        packets = [
            open_share(
                sealed[d],
                run=roster.run,
                dealer=d,
                recipient=self.name,
                key=self._kex,
                params=self.params,
            )
            for d in others
        ]
        return dealer.finish(roster, [*packets, dealer.packet_for(self.name)])
