"""The server's side of the multiparty key ceremony in a deployment (docs/multiparty.md).

When a run has ``encryption-backend = "ckks-multiparty"`` and no ``public-context``
(``fedtune deploy run`` without ``--public-context``), the ServerApp runs the ceremony
among the connected nodes before round 1 (:func:`run_ceremony`): five exchanges of
``ceremony`` messages (:mod:`fedtune.secure.multiparty.ceremony_steps`), in which it
relays announcements (each signed with its node's long-term key), the roster,
signatures and sealed shares; each node deals only into a roster of the peers its
owner pinned (:mod:`fedtune.identity`). It holds no secret at
any point: it sees public keys, commitments, signatures and ciphertexts sealed to the
nodes. At the end it writes ``RUN_DIR/keys/roster.json`` and ``RUN_DIR/keys/public.ctx``
(public, 0644), from which the run's codec is built as from any ``public-context``.

The key holders are the nodes that answer ``hello`` (at least ``num-clients``, all of
them if more), by their node-config names (which must differ); the threshold is the
smallest majority, ``n // 2 + 1``, as in ``fedtune simulate``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from fedtune import crypto, identity
from fedtune.apps.server.exchange import exchange
from fedtune.apps.server.replies import clean_reason
from fedtune.errors import FederationError
from fedtune.keyfiles import PUBLIC_MODE, private_dir, write_key_file
from fedtune.secure.multiparty import files
from fedtune.secure.multiparty.ceremony_steps import (
    KEX_BYTES,
    MAX_PARTIES,
    member_from_record,
    sealed_bytes,
    valid_name,
)
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.multiparty.protocol import SIGNATURE_BYTES, Member, Roster, public_context

__all__ = ["KEYS_DIR", "run_ceremony"]

#: Where the server keeps the ceremony's public files in its run directory.
KEYS_DIR = "keys"
_CEREMONY = "ceremony"


def _wait_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise FederationError(
                f'The multiparty key ceremony (`encryption-backend` = "ckks-multiparty") '
                f"needs `num-clients` = {count} nodes online; {len(nodes)} connected after "
                f"{timeout:.0f} s. Start the nodes, then submit the run again."
            )
        time.sleep(0.5)
    return nodes


def _round_trip(
    grid: Grid, step: str, records: Mapping[int, dict[str, Any]], *, timeout: float
) -> dict[int, ConfigRecord]:
    """One ceremony message per node; every node must answer (else the ceremony stops)."""
    messages = [
        Message(
            content=RecordDict(
                {
                    "config": ConfigRecord({"server-round": 0}),
                    _CEREMONY: ConfigRecord({"step": step, **record}),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node, record in records.items()
    ]
    got: dict[int, ConfigRecord] = {}
    refused: dict[int, str] = {}
    for reply in exchange(grid, messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            refused[node] = clean_reason(reply.error.reason)
        elif _CEREMONY in reply.content.config_records:
            got[node] = reply.content.config_records[_CEREMONY]
    missing = sorted(set(records) - set(got))
    if missing:
        why = ", ".join(f"node {n}: {refused.get(n, 'no reply')}" for n in missing)
        raise FederationError(
            f"Multiparty key ceremony, step {step!r}: {why}. Stopping before round 1; "
            "nothing was trained. Submit the run again for a new ceremony (see the nodes' "
            "logs for a `keygen-aborted`)."
        )
    return got


def _fail(step: str, node: int, what: str) -> FederationError:
    return FederationError(
        f"Multiparty key ceremony, step {step!r}: node {node} answered {what}. Stopping "
        "before round 1; submit the run again."
    )


def run_ceremony(
    grid: Grid,
    *,
    num_clients: int,
    run: str,
    keys_dir: Path,
    timeout: float,
    params: MultipartyParams | None = None,
) -> Path:
    """Run the ceremony among the online nodes; write and return ``keys_dir/public.ctx``.

    Raises
    ------
    FederationError
        Fewer than ``num-clients`` nodes, two nodes with one name, a node that does not
        answer a step or refuses it (its fixed code is named), or a malformed answer.
    """
    params = params or MultipartyParams()
    if not 2 <= num_clients <= MAX_PARTIES:
        raise FederationError(
            f'`encryption-backend` = "ckks-multiparty" needs 2 to {MAX_PARTIES} key holders '
            f"(`num-clients`), got {num_clients}."
        )
    started = time.perf_counter()
    nodes = _wait_nodes(grid, num_clients, timeout)[:MAX_PARTIES]
    label = f"{run}/{secrets.token_hex(16)}"  # a fresh ceremony: new keys, new commitments
    hello = _round_trip(grid, "hello", {n: {} for n in nodes}, timeout=timeout)
    names: dict[int, str] = {}
    kex: dict[str, bytes] = {}
    for node, rec in hello.items():
        name, key = rec.get("name"), rec.get("kex-key")
        if not valid_name(name) or not isinstance(key, bytes) or len(key) != KEX_BYTES:
            raise _fail("hello", node, "a malformed name or key")
        assert isinstance(name, str)
        if name in kex:
            raise FederationError(
                f"Multiparty key ceremony: two nodes are named {name!r}; give each node its "
                "own `fedtune deploy supernode --name` and submit the run again."
            )
        names[node], kex[name] = name, key
    order = sorted(kex)
    abscissae = {name: i + 1 for i, name in enumerate(order)}
    threshold = len(order) // 2 + 1
    announce: dict[str, Any] = {
        "run": label,
        "threshold": threshold,
        "names": order,
        "abscissae": [abscissae[n] for n in order],
    }
    got = _round_trip(grid, "announce", {n: announce for n in nodes}, timeout=timeout)
    members: dict[str, Member] = {}
    node_keys: dict[str, str] = {}
    node_sigs: dict[str, bytes] = {}
    for node, rec in got.items():
        try:
            member = member_from_record(rec, recipients=order)
        except ValueError as err:
            raise _fail("announce", node, f"a malformed announcement ({err})") from err
        if member.name != names[node] or member.x != abscissae[member.name]:
            raise _fail("announce", node, "another party's name or abscissa")
        node_key, node_sig = rec.get("node-key"), rec.get("node-signature")
        digest = identity.announcement_digest(
            run=label,
            name=member.name,
            x=member.x,
            verify_key=member.verify_key,
            commitments=member.commitments,
            kex=kex[member.name],
        )
        if not isinstance(node_key, str) or not identity.verifies(node_key, node_sig, digest):
            raise _fail("announce", node, "an announcement its node key did not sign")
        assert isinstance(node_sig, bytes)  # verifies() checked it
        if node_key in node_keys.values():
            raise _fail("announce", node, "the node key of another party")
        members[member.name], node_keys[member.name] = member, node_key
        node_sigs[member.name] = node_sig
    roster = Roster(
        run=label, threshold=threshold, params=params, members=tuple(members[n] for n in order)
    )
    roster_record: dict[str, Any] = {
        "roster": files.roster_bytes(roster),
        "kex-names": order,
        "kex-keys": [kex[n] for n in order],
        # each node checks these against the peers its owner pinned (fedtune.identity)
        "node-names": order,
        "node-keys": [node_keys[n] for n in order],
        "node-signatures": [node_sigs[n] for n in order],
    }
    got = _round_trip(grid, "roster", {n: roster_record for n in nodes}, timeout=timeout)
    signatures: dict[str, bytes] = {}
    for node, rec in got.items():
        sig = rec.get("signature")
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
            raise _fail("roster", node, "a malformed signature")
        signatures[names[node]] = sig
    deal: dict[str, Any] = {"names": order, "signatures": [signatures[n] for n in order]}
    got = _round_trip(grid, "deal", {n: deal for n in nodes}, timeout=timeout)
    # recipient -> dealer -> sealed share: the server only routes ciphertexts
    inbox: dict[str, dict[str, bytes]] = {n: {} for n in order}
    size = sealed_bytes(params)
    for node, rec in got.items():
        recipients, packets = rec.get("recipients"), rec.get("packets")
        others = sorted(n for n in order if n != names[node])
        if (
            not isinstance(recipients, list)
            or recipients != others
            or not isinstance(packets, list)
            or len(packets) != len(others)
            or not all(isinstance(p, bytes) and len(p) == size for p in packets)
        ):
            raise _fail("deal", node, f"not one sealed share of {size} bytes per other party")
        for recipient, packet in zip(others, packets, strict=True):
            assert isinstance(packet, bytes)  # checked above
            inbox[recipient][names[node]] = packet
    receive: dict[int, dict[str, Any]] = {}
    for node in nodes:
        dealers = sorted(inbox[names[node]])
        receive[node] = {
            "dealers": dealers,
            "packets": [inbox[names[node]][d] for d in dealers],
        }
    got = _round_trip(grid, "receive", receive, timeout=timeout)
    for node, rec in got.items():
        if rec.get("roster-digest") != roster.digest:
            raise _fail("receive", node, "another roster digest")
    keys_dir = private_dir(keys_dir, "run-dir")
    keys_dir.chmod(0o755)  # public files only: the roster and the public context
    for stale in ("roster.json", "public.ctx"):
        (keys_dir / stale).unlink(missing_ok=True)
    files.save_roster(roster, keys_dir)
    public = keys_dir / "public.ctx"
    write_key_file(public, crypto.context_to_bytes(public_context(roster)), PUBLIC_MODE)
    # On the run's console (the operator's `fedtune deploy run` stream), not only a log.
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"multiparty key ceremony done in {time.perf_counter() - started:.1f} s: "
        f"{len(order)} key holders {order}, threshold {threshold}, roster digest "
        f"{roster.digest} (each node logs the digest it signed: compare them)"
    )
    return public
