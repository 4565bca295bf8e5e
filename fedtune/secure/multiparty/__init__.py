"""Multiparty CKKS: no party holds a key that opens another's upload (issue 28).

See ``docs/multiparty.md`` for the protocol, the threat model and the numbers. In short:
each data owner encrypts with its own SEAL key (seeded, exactly as shared-key CKKS),
Shamir-shares that key among the key holders in a ceremony before round 1, signs its
uploads with its own Ed25519 key, and a quorum of ``t`` key holders turns the verified
sum of one round (and only one) into plaintext with smudged partial decryptions.

Modules: :mod:`.params` (parameters, smudging width), :mod:`.ring` (RNS arithmetic on
SEAL's NTT form), :mod:`.protocol` (ceremony, signed uploads, partial decryption,
combination), :mod:`.backend` (the ``ckks-multiparty`` codec backend).
"""

from fedtune.secure.multiparty.params import MULTIPARTY_CKKS, MultipartyParams
from fedtune.secure.multiparty.protocol import (
    DecryptionRequest,
    KeygenAborted,
    PartialDecryption,
    Party,
    Roster,
    ceremony,
    combine,
    make_receipt,
    public_context,
)

__all__ = [
    "MULTIPARTY_CKKS",
    "DecryptionRequest",
    "KeygenAborted",
    "MultipartyParams",
    "PartialDecryption",
    "Party",
    "Roster",
    "ceremony",
    "combine",
    "make_receipt",
    "public_context",
]
