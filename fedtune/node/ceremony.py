"""A deployed node's side of the multiparty key ceremony (``ckks-multiparty``).

Before round 1 of a deployed multiparty run the ServerApp sends every node five
``ceremony`` messages (evaluate messages with a ``ceremony`` record whose ``step`` is
``hello``, ``announce``, ``roster``, ``deal`` or ``receive``;
:mod:`fedtune.secure.multiparty.ceremony_steps` says what each does). The node worker
answers them here, with its own name and state directory (from its node config, never
from a message), and keeps the ceremony's secrets (its X25519 key, its SEAL key, its
signing key, the shares it deals) in this process only. At the end it writes into its
own state directory, 0700 / 0600 (:mod:`fedtune.keyfiles`)::

    STATE_DIR/multiparty/<roster digest>/roster.json    public
    STATE_DIR/multiparty/<roster digest>/<name>.party   its key, signing key, shares
    STATE_DIR/multiparty/runs/<sha256 of the run name>   the run's roster digest

which :func:`fedtune.node.round.runtime_for` then opens as the node's secret context.
Every field is parsed strictly (types, counts, sizes, names) before use; a refusal is
one fixed code: ``bad-request`` (malformed), ``keygen-aborted`` (a check of the
ceremony failed: the node's log says which), ``policy:peers`` (the roster holds a
member that is not one of this node's pinned peers, a key twice or an announcement its
node key did not sign, or the node pinned no peers: :mod:`fedtune.identity`),
``policy`` (the run is not a multiparty run, or this node has no state directory or
node key).

The node signs its announcement with its long-term node key (``node-key``, the
``--key`` of ``fedtune deploy supernode``) and checks every member's before it signs
the roster, so before it deals a share: the server chooses who answers, but an honest
node deals only into a roster of the peers its owner pinned (``--peer``).

A worker restarted mid-ceremony has lost its secrets: it refuses the later steps
(``keygen-aborted``) and the server stops the run with one line; submitting the run
again starts a new ceremony.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedtune import identity
from fedtune.config import parse_wiring
from fedtune.errors import (
    ConfigError,
    KeygenAborted,
    NodeRefusal,
    PolicyError,
    ServerMessageError,
)
from fedtune.keyfiles import PRIVATE_MODE, private_dir
from fedtune.messages import CEREMONY_FIELDS
from fedtune.privacy.policy_file import load_policy
from fedtune.secure.multiparty import files
from fedtune.secure.multiparty.backend import MultipartyBackend
from fedtune.secure.multiparty.ceremony_steps import (
    KEX_BYTES,
    MAX_PARTIES,
    CeremonyParty,
    member_to_record,
    sealed_bytes,
)
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.multiparty.protocol import SIGNATURE_BYTES, Member, Roster

__all__ = [
    "CEREMONY",
    "MULTIPARTY",
    "ceremony_reply",
    "party_path",
    "reply",
    "use_party_file",
]

log = logging.getLogger("fedtune.node")

#: The record a ceremony message carries.
CEREMONY = "ceremony"
MULTIPARTY = MultipartyBackend.name

#: (state dir, run name) -> this node's party during its ceremony (this process only).
_SESSIONS: dict[tuple[str, str], CeremonyParty] = {}


def _pointer(state_dir: Path, run_name: str) -> Path:
    # the run name comes from the server's run config: hashed, never a path of its choosing
    digest = hashlib.sha256(run_name.encode()).hexdigest()[:32]
    return Path(state_dir) / "multiparty" / "runs" / digest


def party_path(state_dir: Path, run_name: str, name: str) -> Path:
    """This node's party file for run ``run_name`` (its last finished ceremony's).

    ``STATE_DIR/multiparty/runs/<sha256(run name)>`` holds the roster digest of that
    ceremony; its files are in ``STATE_DIR/multiparty/<roster digest>/``. A run resumed
    under the same ``run-id`` finds the same keys; a new ceremony for the name points
    it at new ones (the old files stay: nothing is overwritten).
    """
    pointer = _pointer(state_dir, run_name)
    try:
        with pointer.open("rb") as fh:
            digest = fh.read(65).decode("ascii")
    except (OSError, UnicodeDecodeError):
        digest = ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        digest = "none"  # no finished ceremony: a path that does not exist
    return Path(state_dir) / "multiparty" / digest / f"{name}.party"


def _point(state_dir: Path, run_name: str, digest: str) -> None:
    pointer = _pointer(state_dir, run_name)
    private_dir(pointer.parent, "--state-dir")
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(digest.encode("ascii"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, pointer)


def _str_list(record: Mapping[str, object], key: str, *, limit: int = MAX_PARTIES) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        raise ServerMessageError(f"ceremony field {key!r} is not a list of 1..{limit} items.")
    if not all(isinstance(v, str) for v in value):
        raise ServerMessageError(f"ceremony field {key!r} is not a list of strings.")
    return [str(v) for v in value]


def _bytes_list(record: Mapping[str, object], key: str, *, size: int, count: int) -> list[bytes]:
    value = record.get(key)
    if (
        not isinstance(value, list)
        or len(value) != count
        or not all(isinstance(v, bytes) and len(v) == size for v in value)
    ):
        raise ServerMessageError(f"ceremony field {key!r} is not {count} items of {size} bytes.")
    return [bytes(v) for v in value]


def _named(record: Mapping[str, object], names: str, values: str, *, size: int) -> dict[str, bytes]:
    keys = _str_list(record, names)
    if len(set(keys)) != len(keys):
        raise ServerMessageError(f"ceremony field {names!r} names a party twice.")
    return dict(zip(keys, _bytes_list(record, values, size=size, count=len(keys)), strict=True))


def _announcement(run: str, name: str, member: Member, kex: bytes) -> bytes:
    return identity.announcement_digest(
        run=run,
        name=name,
        x=member.x,
        verify_key=member.verify_key,
        commitments=member.commitments,
        kex=kex,
    )


def _check_pins(
    record: Mapping[str, object],
    roster: Roster,
    kex: Mapping[str, bytes],
    *,
    me: str,
    peers: tuple[str, ...] | str,
    node_key: Path,
) -> None:
    """Every member's node key and signature, checked against this node's pins."""
    names = _str_list(record, "node-names")
    keys = _str_list(record, "node-keys")
    sigs = record.get("node-signatures")
    if (
        sorted(names) != sorted(m.name for m in roster.members)
        or len(keys) != len(names)
        or not isinstance(sigs, list)
        or len(sigs) != len(names)
        or not all(isinstance(v, bytes) and len(v) <= identity.MAX_SIGNATURE for v in sigs)
        or not all(len(k) <= identity.MAX_PUBLIC_KEY for k in keys)
    ):
        raise ServerMessageError(
            "ceremony `node-names`, `node-keys` and `node-signatures` are not one key and "
            "one signature per roster member."
        )
    if sorted(kex) != sorted(names):
        return  # sign_roster refuses it (keygen-aborted)
    by_name = {m.name: m for m in roster.members}
    members = {
        n: (k, bytes(s), _announcement(roster.run, n, by_name[n], kex[n]))
        for n, k, s in zip(names, keys, sigs, strict=True)
    }
    mine = identity.public_of(identity.read_node_key(node_key))
    identity.check_roster(me=me, my_key=mine, pins=peers, members=members)


def _check_run(run_config: Mapping[str, object], node_config: Mapping[str, object]) -> None:
    backend = run_config.get("encryption-backend")
    if str(run_config.get("encryption")).lower() != "true" or backend != MULTIPARTY:
        raise ConfigError(
            f"a key ceremony for a run whose config is not `encryption` = true with "
            f'`encryption-backend` = "{MULTIPARTY}"; refused.'
        )
    if node_config.get("secret-context"):
        raise ConfigError(
            "this node was started with --secret-context (a shared CKKS key); a multiparty "
            "run needs none: start it without one."
        )


def _multiparty(merged: Mapping[str, object], node_config: Mapping[str, object]) -> bool:
    """A multiparty run on a node without a (shared) ``secret-context``."""
    return (
        str(merged.get("encryption")).lower() == "true"
        and merged.get("encryption-backend") == MULTIPARTY
        and not node_config.get("secret-context")
    )


def use_party_file(
    merged: dict[str, object],
    node_config: Mapping[str, object],
    *,
    run_id: int,
    name: str,
    deployed: bool,
) -> None:
    """Point a deployed node's ``secret-context`` at its own party file for this run.

    ``merged`` is the node's settings over the run config
    (:func:`fedtune.node.round.node_settings`); unchanged unless the node is deployed, the
    run is multiparty and the node has a ``state-dir`` and no ``secret-context`` of its own.
    """
    if deployed and _multiparty(merged, node_config) and merged.get("state-dir"):
        state = Path(str(merged["state-dir"]))
        run_name = parse_wiring(merged).run_name(run_id)
        merged["secret-context"] = str(party_path(state, run_name, name))


def reply(
    content: RecordDict,
    merged: Mapping[str, object],
    node_config: Mapping[str, object],
    *,
    run_id: int,
    deployed: bool,
) -> RecordDict:
    """A ceremony message's reply, from the node's settings over the run config."""
    if not deployed:
        raise ServerMessageError("a key ceremony message reached a simulated client.")
    state = merged.get("state-dir")
    key = node_config.get("node-key")
    return ceremony_reply(
        content,
        name=str(merged["name"]),
        state_dir=Path(str(state)) if state else None,
        run_config=merged,
        node_config=node_config,
        run_name=parse_wiring(merged).run_name(run_id),
        peers=load_policy(Path(str(state)) if state else None, node_config).peers,
        node_key=Path(str(key)) if key else None,
    )


def ceremony_reply(
    content: RecordDict,
    *,
    name: str,
    state_dir: Path | None,
    run_config: Mapping[str, object],
    node_config: Mapping[str, object],
    run_name: str,
    peers: tuple[str, ...] | str,
    node_key: Path | None,
) -> RecordDict:
    """The reply to one ceremony message (see the module docstring).

    ``peers``: the node policy's pinned peer keys, or ``"any"``
    (:attr:`~fedtune.privacy.policy.NodePolicy.peers`); ``node_key``: this node's
    private key file (node config ``node-key``).
    """
    _check_run(run_config, node_config)
    if state_dir is None:
        raise ConfigError("a multiparty key holder needs `state-dir` for its party file.")
    record = content.config_records[CEREMONY]
    step = record.get("step")
    key = (str(state_dir), run_name)
    if not peers:
        _SESSIONS.pop(key, None)
        log.warning(
            "multiparty ceremony (run %r) refused: this node pinned no peers; give "
            "`fedtune deploy supernode` the other data owners' keys (--peer NAME.pub), or "
            "--peer any to trust the server's roster",
            run_name,
        )
        raise NodeRefusal("policy:peers")
    if node_key is None:
        raise ConfigError(
            "a multiparty key holder signs its announcement with its node key: node config "
            "`node-key` (the --key of `fedtune deploy supernode`) is missing."
        )
    try:
        out = _step(
            step,
            record,
            key=key,
            name=name,
            state_dir=state_dir,
            run_name=run_name,
            peers=peers,
            node_key=node_key,
        )
    except KeygenAborted as err:
        _SESSIONS.pop(key, None)
        log.warning("multiparty ceremony, step %r: %s", step, err)
        raise NodeRefusal("keygen-aborted") from err
    except PolicyError as err:
        _SESSIONS.pop(key, None)
        log.warning("multiparty ceremony (run %r), step %r: %s", run_name, step, err)
        raise NodeRefusal("policy:peers") from err
    undeclared = sorted(k for k in out if (CEREMONY, k) not in CEREMONY_FIELDS)
    if undeclared:  # every field that leaves a node has a declared status (fedtune.messages)
        raise RuntimeError(f"ceremony reply fields {undeclared} are not in CEREMONY_FIELDS.")
    return RecordDict(
        {"info": ConfigRecord({"client": name}), CEREMONY: ConfigRecord(out)}  # type: ignore[arg-type]
    )


def _step(
    step: object,
    record: Mapping[str, object],
    *,
    key: tuple[str, str],
    name: str,
    state_dir: Path,
    run_name: str,
    peers: tuple[str, ...] | str,
    node_key: Path,
) -> dict[str, object]:
    params = MultipartyParams()  # the node's own: the server cannot thin the smudging
    if step == "hello":
        fresh = _SESSIONS[key] = CeremonyParty(name, params=params)
        log.info("multiparty ceremony (run %r): hello as %r", run_name, name)
        return {"name": name, "kex-key": fresh.kex_public}
    party = _SESSIONS.get(key)
    if party is None:
        raise KeygenAborted(f"{name}: no ceremony under way for run {run_name!r} (a restart?).")
    if step == "announce":
        names = _str_list(record, "names")
        xs = record.get("abscissae")
        run, threshold = record.get("run"), record.get("threshold")
        if not isinstance(xs, list) or len(xs) != len(names) or len(set(names)) != len(names):
            raise ServerMessageError("ceremony `names` and `abscissae` do not match.")
        if not isinstance(run, str) or type(threshold) is not int:
            raise ServerMessageError("ceremony `run` or `threshold` is malformed.")
        abscissae = dict(zip(names, xs, strict=True))
        member = party.announce(run=run, abscissae=abscissae, threshold=threshold)
        signing = identity.read_node_key(node_key)
        digest = _announcement(run, member.name, member, party.kex_public)
        return {
            **member_to_record(member),
            "node-key": identity.public_of(signing),
            "node-signature": identity.sign(signing, digest),
        }
    if step == "roster":
        data = record.get("roster")
        if not isinstance(data, bytes):
            raise ServerMessageError("ceremony `roster` is not bytes.")
        roster = files.parse_roster(data, where="the ceremony's roster", max_members=MAX_PARTIES)
        kex = _named(record, "kex-names", "kex-keys", size=KEX_BYTES)
        _check_pins(record, roster, kex, me=name, peers=peers, node_key=node_key)
        return {"signature": party.sign_roster(roster, kex)}
    if step == "deal":
        sealed = party.deal(_named(record, "names", "signatures", size=SIGNATURE_BYTES))
        order = sorted(sealed)
        return {"recipients": order, "packets": [sealed[r] for r in order]}
    if step == "receive":
        got = _named(record, "dealers", "packets", size=sealed_bytes(params))
        done = party.finish(got)
        directory = private_dir(Path(state_dir) / "multiparty" / done.roster.digest, "--state-dir")
        files.save_roster(done.roster, directory)
        files.save_party(done, directory)
        _point(state_dir, run_name, done.roster.digest)
        del _SESSIONS[key]
        log.info(
            "multiparty ceremony (run %r) done: %d parties, threshold %d, roster digest %s "
            "(compare it with the other data owners'); party file %s",
            run_name,
            len(done.roster.members),
            done.roster.threshold,
            done.roster.digest,
            party_path(state_dir, run_name, name),
        )
        return {"roster-digest": done.roster.digest}
    raise ServerMessageError(f"unknown ceremony step {step!r}.")
