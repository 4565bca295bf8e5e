"""What a key holder keeps on disk: its party file, the public roster, its round log.

``roster.json`` (public, 0644)
    Every announcement, the threshold and the parameters; its digest is the run's
    ``key_id``. The server builds its public context from it.
``<name>.party`` (0600, the node's own)
    One JSON header line, then the party's SEAL secret key (as ``secret.ctx`` holds it),
    its Ed25519 signing key (32 bytes) and its shares, one per roster member in roster
    order (``L N`` little-endian uint64 each). It opens only the party's own uploads and,
    with ``t - 1`` other party files, any upload: keep it like ``secret.ctx``.
``<rounds>/<roster digest>/round-<r>.bin`` (0600)
    The request digest and the partial decryption this party gave in round ``r``, written
    before the partial leaves: after a restart the same request gets the same bytes, a
    different one is refused (:class:`RoundLog`). ``<rounds>`` is
    ``STATE_DIR/multiparty-rounds`` on a node, ``RUN_DIR/privacy/<name>.multiparty-rounds``
    in a simulation (:func:`fedtune.node.verified.round_log_dir`).

The files are read back as untrusted input: bounded reads, every size and range checked,
the signing key checked against the roster's verification key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.crypto.context import context_from_bytes, context_to_bytes
from fedtune.crypto.params import CkksParams
from fedtune.errors import MultipartyFileError as FileError
from fedtune.keyfiles import PRIVATE_MODE, PUBLIC_MODE, private_dir, write_key_file
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.multiparty.protocol import (
    Dealer,
    Member,
    PartialDecryption,
    Party,
    Roster,
)

__all__ = [
    "RoundLog",
    "keep_round_log",
    "load_party",
    "load_roster",
    "parse_roster",
    "roster_bytes",
    "save_party",
    "save_roster",
]

_FORMAT = "fedtune-multiparty-party"
_ROSTER_FORMAT = "fedtune-multiparty-roster"
_MAX_HEADER = 4096
_MAX_ROSTER_BYTES = 4 * 2**20
_MAX_PARTY_BYTES = 512 * 2**20
_MAX_ROUND_BYTES = 64 * 2**20


def roster_bytes(roster: Roster) -> bytes:
    p = roster.params
    doc = {
        "format": _ROSTER_FORMAT,
        "version": 1,
        "run": roster.run,
        "threshold": roster.threshold,
        "params": {
            "poly_modulus_degree": p.ckks.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(p.ckks.coeff_mod_bit_sizes),
            "global_scale_bits": p.ckks.global_scale_bits,
            "security_bits": p.security_bits,
            "max_rounds": p.max_rounds,
            "max_uploads": p.max_uploads,
        },
        "members": [
            {
                "name": m.name,
                "x": m.x,
                "verify_key": m.verify_key.hex(),
                "commitments": {k: v.hex() for k, v in sorted(m.commitments.items())},
            }
            for m in roster.members
        ],
        "digest": roster.digest,
    }
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def _read(path: Path, limit: int) -> bytes:
    with Path(path).open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FileError(f"{str(path)!r} is over {limit} bytes: not a multiparty key file.")
    return data


def load_roster(path: Path) -> Roster:
    """Read ``roster.json``; the stored digest must be the recomputed one."""
    return parse_roster(_read(path, _MAX_ROSTER_BYTES), where=repr(str(path)))


def parse_roster(data: bytes, *, where: str = "the roster", max_members: int = 1024) -> Roster:
    """A roster from :func:`roster_bytes`'s JSON (a file, or a ceremony message), checked.

    At most ``max_members`` members and :data:`_MAX_ROSTER_BYTES` bytes; the stored digest
    must be the recomputed one.
    """
    try:
        if not isinstance(data, bytes) or len(data) > _MAX_ROSTER_BYTES:
            raise ValueError(f"not bytes of at most {_MAX_ROSTER_BYTES}")
        doc = json.loads(data)
        if not isinstance(doc.get("members"), list) or len(doc["members"]) > max_members:
            raise ValueError(f"not a list of at most {max_members} members")
        if doc["format"] != _ROSTER_FORMAT or doc["version"] != 1:
            raise ValueError(f"format {doc['format']!r} v{doc['version']!r}")
        p = doc["params"]
        params = MultipartyParams(
            ckks=CkksParams(
                poly_modulus_degree=p["poly_modulus_degree"],
                coeff_mod_bit_sizes=tuple(p["coeff_mod_bit_sizes"]),
                global_scale_bits=p["global_scale_bits"],
            ),
            security_bits=p["security_bits"],
            max_rounds=p["max_rounds"],
            max_uploads=p["max_uploads"],
        )
        members = tuple(
            Member(
                name=str(m["name"]),
                x=int(m["x"]),
                verify_key=bytes.fromhex(m["verify_key"]),
                commitments={str(k): bytes.fromhex(v) for k, v in m["commitments"].items()},
            )
            for m in doc["members"]
        )
        roster = Roster(
            run=str(doc["run"]), threshold=int(doc["threshold"]), params=params, members=members
        )
        stored = doc["digest"]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FileError(f"{where} is not a multiparty roster ({err}).") from err
    if roster.digest != stored:
        raise FileError(
            f"{where}: roster digest {str(stored)[:16]}... stored, "
            f"{roster.digest[:16]}... recomputed; restore the roster of the ceremony."
        )
    return roster


def save_roster(roster: Roster, directory: Path) -> Path:
    path = Path(directory) / "roster.json"
    write_key_file(path, roster_bytes(roster), PUBLIC_MODE)
    return path


def save_party(party: Party, directory: Path) -> Path:
    """Write ``<name>.party`` (0600) in ``directory`` (made 0700); never overwrites."""
    directory = private_dir(Path(directory), "--out")
    key = context_to_bytes(party.dealer.context, include_secret_key=True)
    signing = party.dealer._signing.private_bytes_raw()
    order = [m.name for m in party.roster.members]
    shares = b"".join(np.ascontiguousarray(party.shares[n], dtype="<u8").tobytes() for n in order)
    header = {
        "format": _FORMAT,
        "version": 1,
        "name": party.name,
        "roster": party.roster.digest,
        "key_bytes": len(key),
        "share_bytes": len(shares),
    }
    path = directory / f"{party.name}.party"
    line = json.dumps(header, sort_keys=True).encode() + b"\n"
    write_key_file(path, line + key + signing + shares, PRIVATE_MODE)
    return path


def load_party(path: Path, roster: Roster, *, rounds: Path | None = None) -> Party:
    """Read a party file written by :func:`save_party` for ``roster``.

    ``rounds``: the directory of its :class:`RoundLog` (``None``: in memory).
    """
    data = _read(path, _MAX_PARTY_BYTES)
    end = data.find(b"\n", 0, _MAX_HEADER)
    try:
        if end < 0:
            raise ValueError("no header line")
        header = json.loads(data[:end])
        if header["format"] != _FORMAT or header["version"] != 1:
            raise ValueError(f"format {header['format']!r} v{header['version']!r}")
        name, n_key, n_shares = header["name"], header["key_bytes"], header["share_bytes"]
        if header["roster"] != roster.digest:
            raise ValueError("it belongs to another roster")
        member = roster.member(name)
        if member is None:
            raise ValueError(f"{name!r} is not in the roster")
    except (KeyError, TypeError, ValueError) as err:
        raise FileError(f"{str(path)!r} is not this run's party file ({err}).") from err
    params = roster.params
    n = params.ckks.poly_modulus_degree
    lvl = params.ckks.data_prime_count
    body = data[end + 1 :]
    expected = len(roster.members) * lvl * n * 8
    if (
        not isinstance(n_key, int)
        or not isinstance(n_shares, int)
        or n_shares != expected
        or len(body) != n_key + 32 + n_shares
    ):
        raise FileError(f"{str(path)!r}: sizes do not match its header and the roster.")
    context = context_from_bytes(body[:n_key])
    if context.params != params.ckks or not context.has_secret_key:
        raise FileError(f"{str(path)!r}: its key is not a secret key of the run's parameters.")
    signing = Ed25519PrivateKey.from_private_bytes(body[n_key : n_key + 32])
    if signing.public_key().public_bytes_raw() != member.verify_key:
        raise FileError(f"{str(path)!r}: its signing key is not {name!r}'s in the roster.")
    primes = np.array(context.layout.primes, dtype=np.uint64)[:, None]
    shares = {}
    raw = np.frombuffer(body, dtype="<u8", offset=n_key + 32).reshape(-1, lvl, n)
    for m, share in zip(roster.members, raw, strict=True):
        if (share >= primes).any():
            raise FileError(f"{str(path)!r}: the share from {m.name!r} is out of range.")
        shares[m.name] = share.copy()
    dealer = Dealer.__new__(Dealer)
    dealer.name, dealer.run, dealer.params = name, roster.run, params
    dealer.context, dealer._signing, dealer._packets = context, signing, {}
    dealer.announcement = member
    party = Party(dealer, roster, shares)
    if rounds is not None:
        party.used = RoundLog(rounds, name=name)  # type: ignore[assignment]
    return party


class RoundLog:
    """``round -> (request digest, partial)`` on disk, written before the partial leaves.

    One file a round, ``round-<r>.bin`` (0600, written once by
    :func:`fedtune.keyfiles.write_key_file`: a fresh temporary name, ``fsync``, then
    ``link``, so a crash leaves the whole file or none, and nothing is ever replaced).
    Its bytes: :data:`_MAGIC`, the request digest, the chunk count, the chunks
    (length-prefixed), the party's name, and the SHA-256 of all that. A file that is a
    link, has more than one name, or does not parse and hash refuses every request of
    its round (:class:`~fedtune.errors.MultipartyFileError`, one line): the party fails
    closed rather than answer a round twice.
    """

    _MAGIC = b"fedtune-round-log/v1\x00"
    _HEAD = struct.Struct("<32sQ")
    _MAX_CHUNKS = 4096

    def __init__(self, directory: Path, *, name: str | None = None) -> None:
        self.directory = private_dir(Path(directory), "rounds")
        self.name = name

    def _path(self, server_round: int) -> Path:
        return self.directory / f"round-{int(server_round)}.bin"

    def _corrupt(self, path: Path, why: str) -> FileError:
        return FileError(
            f"{str(path)!r}: the round log of this key holder {why}; it answers no decryption "
            "request of that round (fail closed). Restore the file it wrote; never delete it."
        )

    def _read_log(self, path: Path) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise  # no answer in that round: get() returns None
        except OSError as err:
            raise self._corrupt(path, f"cannot be opened ({err.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise self._corrupt(path, "is not a plain file with one name (a link?)")
            if st.st_size > _MAX_ROUND_BYTES:
                raise self._corrupt(path, f"is over {_MAX_ROUND_BYTES} bytes")
            chunks, left = [], st.st_size
            while left > 0 and (piece := os.read(fd, left)):
                chunks.append(piece)
                left -= len(piece)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def get(self, server_round: int) -> tuple[bytes, PartialDecryption] | None:
        """The answer given in ``server_round``, ``None`` if none, or ``FileError``."""
        path = self._path(server_round)
        if path.is_symlink():
            raise self._corrupt(path, "is a symbolic link")
        try:
            data = self._read_log(path)
        except FileNotFoundError:
            return None
        body, check = data[:-32], data[-32:]
        if len(data) < 32 or not hmac.compare_digest(hashlib.sha256(body).digest(), check):
            raise self._corrupt(path, "does not match its checksum (corrupt)")
        try:
            if not body.startswith(self._MAGIC):
                raise ValueError("not a round log")
            pos = len(self._MAGIC)
            digest, count = self._HEAD.unpack_from(body, pos)
            if count > self._MAX_CHUNKS:
                raise ValueError(f"{count} chunks")
            pos, chunks = pos + self._HEAD.size, []
            for _ in range(count):
                (size,) = struct.unpack_from("<Q", body, pos)
                if pos + 8 + size > len(body):
                    raise ValueError("a chunk runs past the end")
                chunks.append(body[pos + 8 : pos + 8 + size])
                pos += 8 + size
            name = body[pos:].decode()
        except (struct.error, ValueError) as err:
            raise self._corrupt(path, f"does not parse ({err})") from None
        if self.name is not None and name != self.name:
            raise self._corrupt(path, f"names another party ({name!r})")
        return digest, PartialDecryption(name, digest, tuple(chunks))

    def __setitem__(self, server_round: int, value: tuple[bytes, PartialDecryption]) -> None:
        digest, partial = value
        parts = [self._MAGIC, self._HEAD.pack(digest, len(partial.chunks))]
        parts += [struct.pack("<Q", len(c)) + c for c in partial.chunks]
        parts.append(partial.name.encode())
        body = b"".join(parts)
        write_key_file(self._path(server_round), body + hashlib.sha256(body).digest(), PRIVATE_MODE)

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("round-*.bin"))


def keep_round_log(party: Party, directory: Path) -> None:
    """Keep ``party``'s answers in ``directory/<roster digest>/`` from now on.

    A party whose log is already there is left as it is; the roster digest in the path
    keeps the round numbers of one key set apart from another's.
    """
    where = Path(directory) / party.roster.digest
    used = party.used
    if isinstance(used, RoundLog) and used.directory == where:
        return
    if isinstance(used, RoundLog) or used:
        raise FileError(
            f"{party.name}: its round log moves to {str(where)!r} after it answered elsewhere; "
            "a key holder keeps one round log per key set."
        )
    party.used = RoundLog(where, name=party.name)  # type: ignore[assignment]
