"""The ``ckks-multiparty`` codec backend (``encryption-backend = "ckks-multiparty"``).

Key files, written by :func:`write_keys` (the ceremony in one process) or, in a
deployment, each party's own by the ceremony over the federation
(:mod:`fedtune.node.ceremony`, :mod:`fedtune.apps.server.ceremony`)::

    roster.json     public: announcements, threshold, parameters (digest = key_id)
    public.ctx      public: the server's context (parameters, key_id; no key)
    <name>.party    0600: one party's upload key, signing key and shares

The server's codec is the unchanged :class:`~fedtune.secure.ckks.CkksCodec` on
``public.ctx``: it validates and adds. A party's codec (:class:`MultipartyCodec`, on its
``.party`` file with ``roster.json`` in the same directory) encrypts under the party's own
key and validates and adds like the server's; it cannot decode alone: a sum is decrypted by
a quorum's signed partial decryptions, which every client checks and combines itself
(:mod:`fedtune.secure.multiparty.rounds`, :mod:`fedtune.secure.multiparty.node`); the codec
then ``decode``s only a sum it opened that way. The simulation driver runs the ceremony
itself (``multiparty_keys``); ``make_keys`` (no party list) refuses with one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedtune import crypto
from fedtune.errors import ConfigError
from fedtune.guard import payload_digest
from fedtune.keyfiles import PUBLIC_MODE, private_dir, write_key_file
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.codec import Codec, PayloadError, WirePayload
from fedtune.secure.multiparty import files
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.multiparty.protocol import (
    SIGNATURE_BYTES,
    Party,
    Roster,
    ceremony,
    public_context,
)

__all__ = ["MultipartyBackend", "MultipartyCodec", "MultipartyServerCodec", "write_keys"]

_NOT_WIRED = (
    '`encryption-backend = "ckks-multiparty"`: each data owner keeps its own key and shares '
    "of the others' (docs/multiparty.md), so there is no key pair to make: `fedtune simulate` "
    "runs the ceremony in process, `fedtune deploy run` runs it over the federation before "
    "round 1 (nodes without --secret-context); in a script, "
    "fedtune.secure.multiparty.backend.write_keys."
)


def write_keys(
    directory: Path,
    names: Sequence[str],
    *,
    run: str,
    threshold: int | None = None,
    params: MultipartyParams | None = None,
) -> dict[str, Path]:
    """Run the ceremony in this process; write ``roster.json``, ``public.ctx`` and one
    ``<name>.party`` per party in ``directory`` (simulation and tests: in a deployment
    each party writes only its own)."""
    roster, parties = ceremony(
        names, run=run, threshold=threshold, params=params or MultipartyParams()
    )
    directory = private_dir(Path(directory), "--out")
    out = {"roster": files.save_roster(roster, directory)}
    out["public"] = directory / "public.ctx"
    write_key_file(out["public"], crypto.context_to_bytes(public_context(roster)), PUBLIC_MODE)
    for party in parties:
        out[party.name] = files.save_party(party, directory)
    return out


class MultipartyCodec(CkksCodec):
    """A party's codec: encrypts under its own key; validates and adds like the server."""

    #: An upload's signature is Ed25519 (64 bytes), not the shared-key HMAC tag.
    tag_bytes = SIGNATURE_BYTES

    def __init__(self, party: Party, *, length: int) -> None:
        super().__init__(party.public, length=length)
        self.party = party
        #: payload digest -> the sum this party opened from the quorum's signed partials
        #: (:func:`~fedtune.secure.multiparty.rounds.open_global`); the newest few only.
        self._opened: dict[str, NDArray[np.float64]] = {}

    @property
    def roster(self) -> Roster:
        return self.party.roster

    def remember(self, payload: WirePayload, total: NDArray[np.float64]) -> None:
        """Keep ``total``, opened and verified from ``payload``'s signed partials."""
        self._opened[payload_digest(payload)] = np.array(total, dtype=np.float64)
        while len(self._opened) > 4:
            self._opened.pop(next(iter(self._opened)))

    @property
    def can_decrypt(self) -> bool:
        return False  # only a quorum decrypts

    def encode(self, vector: NDArray[np.floating]) -> WirePayload:
        vec = np.asarray(vector, dtype=np.float64)
        if vec.shape != (self.length,):
            raise PayloadError(f"vector shape must be ({self.length},), got {vec.shape}.")
        return self.party.encrypt(vec)

    def decode(self, payload: WirePayload) -> NDArray[np.float64]:
        """The sum this party opened from ``payload``'s signed partials (never alone)."""
        opened = self._opened.get(payload_digest(payload))
        if opened is None:
            raise crypto.CryptoError(
                "a multiparty sum is decrypted by a quorum of key holders (signed partial "
                "decryptions, then combine; docs/multiparty.md), not by one party's codec; "
                "this sum came without verified partials."
            )
        return opened.copy()


class MultipartyServerCodec(CkksCodec):
    """The server's codec: the unchanged ``ckks`` checks and sum, plus the roster."""

    tag_bytes = SIGNATURE_BYTES

    def __init__(self, context: crypto.CkksContext, roster: Roster, *, length: int) -> None:
        super().__init__(context, length=length)
        self.roster = roster


class MultipartyBackend:
    """Multiparty CKKS: the server's codec on the public context; key holders via the protocol."""

    name = "ckks-multiparty"
    uses_keys = True

    def make_keys(self, directory: Path) -> crypto.KeyFiles:
        raise ConfigError(_NOT_WIRED)

    def codec(self, *, length: int, context: Path | None = None, public: bool = False) -> Codec:
        """The server's :class:`CkksCodec` on ``public.ctx``, or a party's
        :class:`MultipartyCodec` on its ``.party`` file (``roster.json`` beside it)."""
        if context is None:
            raise ConfigError(_NOT_WIRED)
        context = Path(context)
        if context.is_dir():  # a simulation: one directory with every party's file
            raise ConfigError(
                f"`secret-context` {str(context)!r} is the multiparty key directory; each "
                "party opens its own <name>.party in it (fedtune.train.runtime)."
            )
        if context.suffix == ".party":
            if public:
                raise crypto.CryptoError(
                    f"`public-context` {str(context)!r} is a party's key file; the server "
                    "must only get public.ctx."
                )
            roster = files.load_roster(context.parent / "roster.json")
            return MultipartyCodec(files.load_party(context, roster), length=length)
        if not public:
            raise ConfigError(_NOT_WIRED)
        loaded = crypto.load_context(Path(context), public=True)
        if loaded.params.poly_modulus_degree != 8192 or crypto.has_secret_key(loaded):
            raise crypto.CryptoError(
                f"`public-context` {str(context)!r} is not a multiparty public context "
                "(N = 8192, no key): write it with fedtune.secure.multiparty.public_context."
            )
        roster = files.load_roster(context.parent / "roster.json")
        if roster.digest != loaded.key_id:
            raise crypto.CryptoError(
                f"`public-context` {str(context)!r} does not belong to the roster.json beside "
                "it (key_id differs): keep the ceremony's files together."
            )
        return MultipartyServerCodec(loaded, roster, length=length)
