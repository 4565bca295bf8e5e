"""A data owner's long-term node identity, and the peers a node pins for the key ceremony.

Each deployed node has one long-term key pair: the SuperNode authentication key of
``fedtune deploy node-key`` (ECDSA on NIST P-384, OpenSSH format; ``KEY`` stays on the
node, ``KEY.pub`` is registered with the SuperLink). In the multiparty key ceremony
(docs/multiparty.md, "The key ceremony") each party signs its announcement with it
(:func:`announcement_digest`, :func:`sign`), and each node, before it signs the roster
and so before it deals any share, checks the roster against the public keys of the
other data owners it pinned (``fedtune deploy supernode --peer KEY.pub``, exchanged out
of band like the registration files; :func:`check_roster`):

* every other member's announcement is signed by one of the pinned keys, its own by
  this node's key;
* no key signs two members (one data owner, one share of every key);
* so the roster has no member outside the pins: the server cannot add members of its
  own (sybils) that, with ``t - 1`` of them, would rebuild an honest node's key.

A node with no pins refuses the ceremony (``policy:peers``) unless its owner opts in
with ``--peer any`` (:data:`ANY`: it trusts the server's roster, as before).

Keys and signatures from the server are parsed here before ``cryptography`` sees them
(type, length, the one key type); the node's private key file is read like any secret:
a regular file (no link), owner-only mode, at most :data:`MAX_KEY_FILE` bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.errors import ConfigError, PolicyError

__all__ = [
    "ANY",
    "KEY_TYPE",
    "MAX_KEY_FILE",
    "MAX_PUBLIC_KEY",
    "MAX_SIGNATURE",
    "announcement_digest",
    "check_roster",
    "public_key_text",
    "public_of",
    "read_node_key",
    "read_public_key",
    "sign",
    "verifies",
]

#: ``--peer any``: the node trusts the server's roster (no pins).
ANY = "any"
#: The one key type of a node identity (what ``fedtune deploy node-key`` writes).
KEY_TYPE = "ecdsa-sha2-nistp384"
#: Longest public key text (``KEY_TYPE`` and base64; a P-384 key is 184 characters).
MAX_PUBLIC_KEY = 256
#: Longest DER ECDSA P-384 signature (at most 104 bytes).
MAX_SIGNATURE = 128
#: Largest key or ``.pub`` file read.
MAX_KEY_FILE = 16 * 1024
_DOMAIN = b"fedtune/multiparty/announcement/v1\x00"


def _lp(*fields: bytes) -> bytes:
    return b"".join(struct.pack("<Q", len(f)) + f for f in fields)


def public_key_text(text: object, *, where: str) -> str:
    """``KEY_TYPE BASE64`` of a node public key given as an OpenSSH line (comment dropped).

    Raises
    ------
    PolicyError
        (key ``peers``) naming ``where``, for anything but one P-384 ECDSA public key.
    """
    fields = text.split() if isinstance(text, str) and len(text) <= MAX_KEY_FILE else []
    try:
        if len(fields) < 2 or fields[0] != KEY_TYPE or len(fields[1]) > MAX_PUBLIC_KEY:
            raise ValueError("type")
        base64.b64decode(fields[1], validate=True)
        key = serialization.load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise PolicyError(
            f"{where}: not a node public key ({KEY_TYPE} ..., what `fedtune deploy node-key` "
            f"writes to NAME.pub), got {str(text)[:80]!r}; give a peer's NAME.pub, or `any`.",
            key="peers",
        )
    return _text(key)


def _text(key: ec.EllipticCurvePublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode("ascii")


def _read_small(path: Path, option: str) -> tuple[bytes, int]:
    """A regular file's bytes and mode, opened without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise ConfigError(
            f"{option} {str(path)!r} cannot be opened ({err.strerror}; a symbolic link is "
            "refused): give the file itself."
        ) from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_KEY_FILE:
            raise ConfigError(
                f"{option} {str(path)!r} is not a regular file of at most {MAX_KEY_FILE} bytes."
            )
        return fh.read(MAX_KEY_FILE + 1), stat.S_IMODE(info.st_mode)


def read_public_key(path: Path) -> str:
    """The node public key in a peer's ``NAME.pub`` (``--peer``), as :func:`public_key_text`."""
    data, _ = _read_small(Path(path), "--peer")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return public_key_text(text, where=f"--peer {str(path)!r}")


def read_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """This node's private key (``--key``): owner-only (no group / other bits), P-384."""
    data, mode = _read_small(Path(path), "--key")
    if mode & 0o077:
        raise ConfigError(
            f"--key {str(path)!r} is open to other users (mode {mode:04o}); run `chmod 600 {path}`."
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None  # type: ignore[assignment]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise ConfigError(
            f"--key {str(path)!r} is not a node key (an unencrypted OpenSSH P-384 key, what "
            "`fedtune deploy node-key` writes)."
        )
    return key


def public_of(key: ec.EllipticCurvePrivateKey) -> str:
    """The public half of a node key, as :func:`public_key_text` writes it."""
    return _text(key.public_key())


def announcement_digest(
    *, run: str, name: str, x: int, verify_key: bytes, commitments: Mapping[str, bytes], kex: bytes
) -> bytes:
    """What a party signs with its node key in step 1: its whole announcement and X25519 key."""
    items = sorted(commitments.items())
    return hashlib.sha384(
        _DOMAIN
        + _lp(run.encode(), name.encode(), str(x).encode(), verify_key, kex)
        + _lp(*[_lp(n.encode(), c) for n, c in items])
    ).digest()


def sign(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """ECDSA P-384 / SHA-384 over ``digest`` (DER)."""
    return key.sign(digest, ec.ECDSA(hashes.SHA384()))


def verifies(public: str, signature: object, digest: bytes) -> bool:
    """Whether ``signature`` (from the server: any type) is ``public``'s over ``digest``."""
    if not isinstance(signature, bytes) or not 1 <= len(signature) <= MAX_SIGNATURE:
        return False
    if len(public) > MAX_PUBLIC_KEY or not public.startswith(f"{KEY_TYPE} "):
        return False
    try:
        key = serialization.load_ssh_public_key(public.encode("ascii"))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(signature, digest, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def check_roster(
    *,
    me: str,
    my_key: str,
    pins: tuple[str, ...] | str,
    members: Mapping[str, tuple[str, bytes, bytes]],
) -> None:
    """Refuse a roster this node has not approved (see the module docstring).

    ``members``: each member's name -> (its node public key, its node signature, its
    :func:`announcement_digest`), as the server relayed them; ``pins``: the node's
    pinned peer keys, or :data:`ANY`.

    Raises
    ------
    PolicyError
        (key ``peers``) naming the first member that fails, and how.
    """
    seen: dict[str, str] = {}
    for name in sorted(members):
        key, signature, digest = members[name]
        if name == me and key != my_key:
            why = "is not this node's own key"
        elif name != me and pins != ANY and (key not in pins or key == my_key):
            why = "is not one of this node's pinned peers (`--peer`): a member the server added?"
        elif key in seen:
            why = f"is also {seen[key]!r}'s: one data owner twice"
        elif not verifies(key, signature, digest):
            why = "did not sign the announcement (a forged or altered announcement)"
        else:
            seen[key] = name
            continue
        raise PolicyError(
            f"{me}: roster member {name!r}: its node key {key[:40]}... {why}; the node deals "
            "nothing into this roster.",
            key="peers",
        )
