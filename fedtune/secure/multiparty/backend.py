"""The ``ckks-multiparty`` codec backend (``encryption-backend = "ckks-multiparty"``).

What works today: the *server's* codec. The public context of a multiparty run is an
ordinary fedtune context file whose ``key_id`` is the roster digest
(:func:`~fedtune.secure.multiparty.protocol.public_context`), so the server validates
and adds uploads with the unchanged :class:`~fedtune.secure.ckks.CkksCodec`. What does
not yet: a key holder's codec, because a multiparty key is not one file. Each party has
its own upload key and shares of everyone else's, made by the ceremony
(:func:`~fedtune.secure.multiparty.protocol.ceremony` in one process), and decoding is a
round of the federation (a quorum's partial decryptions), not a local call. Wiring the
ceremony into ``fedtune keygen`` / the node worker and the round into the server app is
listed in docs/multiparty.md; until then ``make_keys`` and a key holder's codec refuse
with that explanation instead of pretending.
"""

from __future__ import annotations

from pathlib import Path

from fedtune import crypto
from fedtune.config import ConfigError
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.codec import Codec

__all__ = ["MultipartyBackend"]

_NOT_WIRED = (
    '`encryption-backend = "ckks-multiparty"`: the multiparty key ceremony runs per party '
    "(each data owner keeps its own key and shares of the others', docs/multiparty.md) and "
    "is not wired into `fedtune simulate` / `fedtune keygen` yet; use "
    "fedtune.secure.multiparty.ceremony in a script, or `ckks` for a shared key."
)


class MultipartyBackend:
    """Multiparty CKKS: the server's codec on the public context; key holders via the protocol."""

    name = "ckks-multiparty"
    uses_keys = True

    def make_keys(self, directory: Path) -> crypto.KeyFiles:
        raise ConfigError(_NOT_WIRED)

    def codec(self, *, length: int, context: Path | None = None, public: bool = False) -> Codec:
        """The server's :class:`CkksCodec` on the run's public context (no key at all)."""
        if context is None or not public:
            raise ConfigError(_NOT_WIRED)
        loaded = crypto.load_context(Path(context), public=True)
        if loaded.params.poly_modulus_degree != 8192 or crypto.has_secret_key(loaded):
            raise crypto.CryptoError(
                f"`public-context` {str(context)!r} is not a multiparty public context "
                "(N = 8192, no key): write it with fedtune.secure.multiparty.public_context."
            )
        return CkksCodec(loaded, length=length)
