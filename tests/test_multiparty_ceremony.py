"""The multiparty key ceremony as a deployment runs it (docs/multiparty.md, "The key ceremony").

The server's :func:`~fedtune.apps.server.ceremony.run_ceremony` over an in-process grid
whose nodes are :func:`fedtune.node.round.handle` as a node worker calls it (each with its
own state directory), then the steps one by one with a server that cheats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import identity
from fedtune.apps.cli import main
from fedtune.apps.server.ceremony import run_ceremony
from fedtune.apps.simulation.in_process import InProcessGrid
from fedtune.crypto import load_context
from fedtune.deploy.node import policy_settings
from fedtune.deploy.pki import make_node_key
from fedtune.deploy.submit import run_config
from fedtune.errors import ConfigError, FederationError, KeygenAborted, NodeRefusal, PolicyError
from fedtune.node import ceremony as node_ceremony
from fedtune.node import round as node_round
from fedtune.node.codes import code_of
from fedtune.privacy.policy_file import load_policy, write_policy
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.multiparty import files
from fedtune.secure.multiparty import protocol as mp
from fedtune.secure.multiparty.ceremony_steps import (
    CeremonyParty,
    member_from_record,
    member_to_record,
    open_share,
    seal_share,
)
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.multiparty.protocol import _key_ntt

PARAMS = MultipartyParams()
NAMES = ("node-a", "node-b", "node-c")
RUN_CONFIG = {"encryption": True, "encryption-backend": "ckks-multiparty", "run-id": "r1"}


@pytest.fixture(scope="module")
def node_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node key pair per name (`fedtune deploy node-key`), and one for the server's sybil."""
    out = tmp_path_factory.mktemp("node-keys")
    for name in (*NAMES, "sybil"):
        make_node_key(out, name)
    return out


def _pins(keys: Path, name: str, names: tuple[str, ...] = NAMES) -> str:
    """The node-config `peers` of ``name``: the other data owners' .pub files, as JSON."""
    return json.dumps([(keys / f"{n}.pub").read_text() for n in names if n != name])


def _node(
    name: str,
    state: Path,
    traffic: list[RecordDict],
    *,
    keys: Path,
    peers: str | None = None,
    key: str | None = None,
) -> Callable[[Message], Message]:
    config = {
        "name": name,
        "state-dir": str(state),
        "data-path": "unused.csv",
        "node-key": str(keys / (key or name)),
        "peers": _pins(keys, name) if peers is None else peers,
    }
    if not config["peers"]:
        del config["peers"]

    def handle(msg: Message) -> Message:
        traffic.append(msg.content)
        try:
            content = node_round.handle(
                "evaluate",
                msg.content,
                run_config=RUN_CONFIG,
                node_config=config,
                run_id=5,
                deployed=True,
            )
        except Exception as err:  # noqa: BLE001 - the worker sends one fixed code
            return Message(Error(code=2, reason=code_of(err)), reply_to=msg)
        traffic.append(content)
        return Message(content, reply_to=msg)

    return handle


@pytest.fixture(scope="module", autouse=True)
def _flower_ids() -> None:
    """Flower's Message needs a task identity, as the ServerApp process has."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, node_keys: Path) -> dict[str, object]:
    root = tmp_path_factory.mktemp("ceremony")
    traffic: list[RecordDict] = []
    states = {n: root / n for n in NAMES}
    grid = InProcessGrid(
        {i + 1: _node(n, states[n], traffic, keys=node_keys) for i, n in enumerate(NAMES)}
    )
    public = run_ceremony(grid, num_clients=3, run="r1", keys_dir=root / "keys", timeout=30)
    return {"root": root, "states": states, "traffic": traffic, "public": public}


def test_the_ceremony_writes_public_files_for_the_server_and_a_party_file_per_node(
    deployed: dict[str, object],
) -> None:
    public = deployed["public"]
    assert isinstance(public, Path)
    roster = files.load_roster(public.parent / "roster.json")
    assert sorted(m.name for m in roster.members) == list(NAMES)
    assert roster.threshold == 2 and [m.x for m in roster.members] == [1, 2, 3]
    ctx = load_context(public, public=True)
    assert ctx.key_id == roster.digest and not ctx.has_secret_key
    assert sorted(p.name for p in public.parent.iterdir()) == ["public.ctx", "roster.json"]
    states = deployed["states"]
    assert isinstance(states, dict)
    for name, state in states.items():
        path = node_ceremony.party_path(state, "r1", name)
        assert path.parent.name == roster.digest
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert files.load_party(path, files.load_roster(path.parent / "roster.json")).name == name
        # each state directory holds this node's party file and no other
        found = [p.name for p in state.rglob("*.party")]
        assert found == [f"{name}.party"]


def _parties(deployed: dict[str, object]) -> dict[str, mp.Party]:
    states = deployed["states"]
    assert isinstance(states, dict)
    out = {}
    for name, state in states.items():
        path = node_ceremony.party_path(state, "r1", name)
        out[name] = files.load_party(path, files.load_roster(path.parent / "roster.json"))
    return out


def test_a_quorum_of_deployed_parties_decrypts_an_upload(deployed: dict[str, object]) -> None:
    parties = _parties(deployed)
    roster = parties["node-a"].roster
    public = mp.public_context(roster)
    server = CkksCodec(public, length=300)
    values = np.random.default_rng(3).normal(size=300)
    payload = server.validate(parties["node-a"].encrypt(values))
    sig = parties["node-a"].sign(payload, server_round=1, num_examples=2)
    receipt = mp.make_receipt(public, payload, sig, name="node-a", num_examples=2)
    request = mp.DecryptionRequest(1, (receipt,), 2, ("node-b", "node-c"))  # without node-a
    partials = [parties[n].partial(request, min_count=1) for n in request.quorum]
    out = mp.combine(roster, payload, request, partials)
    assert np.abs(out - values).max() < 8 * PARAMS.decoded_error_std(2)


def test_no_message_of_the_ceremony_holds_a_secret_key(deployed: dict[str, object]) -> None:
    """Every record the server sent or received: no SEAL key, no signing key, no share."""
    traffic = deployed["traffic"]
    assert isinstance(traffic, list) and traffic
    blobs = b"".join(
        v if isinstance(v, bytes) else b"".join(x for x in v if isinstance(x, bytes))
        for content in traffic
        for record in content.config_records.values()
        for v in record.values()
        if isinstance(v, (bytes, list))
    )
    for party in _parties(deployed).values():
        key = _key_ntt(party.dealer.context).astype("<u8").tobytes()
        secrets = [key[:64], key[-64:], party.dealer._signing.private_bytes_raw()]
        secrets += [s.astype("<u8").tobytes()[:64] for s in party.shares.values()]
        assert not any(s in blobs for s in secrets)


def test_a_second_ceremony_for_the_same_run_points_the_node_at_new_keys(
    tmp_path: Path, node_keys: Path
) -> None:
    states = {n: tmp_path / n for n in NAMES}
    for _ in range(2):
        grid = InProcessGrid(
            {i + 1: _node(n, states[n], [], keys=node_keys) for i, n in enumerate(NAMES)}
        )
        keys = tmp_path / "keys"
        run_ceremony(grid, num_clients=3, run="r1", keys_dir=keys, timeout=30)
    digests = {p.name for p in (states["node-a"] / "multiparty").iterdir()} - {"runs"}
    assert len(digests) == 2  # nothing overwritten
    path = node_ceremony.party_path(states["node-a"], "r1", "node-a")
    assert path.parent.name == files.load_roster(keys / "roster.json").digest


def test_too_few_nodes_or_two_with_one_name_stop_before_round_one(
    tmp_path: Path, node_keys: Path
) -> None:
    grid = InProcessGrid({1: _node("node-a", tmp_path / "a", [], keys=node_keys)})
    with pytest.raises(FederationError, match="needs `num-clients` = 2 nodes online; 1"):
        run_ceremony(grid, num_clients=2, run="r1", keys_dir=tmp_path / "k", timeout=0.1)
    twins = InProcessGrid(
        {i: _node("twin", tmp_path / f"t{i}", [], keys=node_keys, key=NAMES[i]) for i in (1, 2)}
    )
    with pytest.raises(FederationError, match="two nodes are named 'twin'"):
        run_ceremony(twins, num_clients=2, run="r1", keys_dir=tmp_path / "k", timeout=5)


def test_a_node_refuses_a_ceremony_for_a_run_that_is_not_multiparty(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not `encryption` = true") as info:
        node_ceremony.ceremony_reply(
            RecordDict({"ceremony": ConfigRecord({"step": "hello"})}),
            name="node-a",
            state_dir=tmp_path,
            run_config={"encryption": True, "encryption-backend": "ckks"},
            node_config={},
            run_name="r1",
            peers="any",
            node_key=None,
        )
    assert code_of(info.value) == "policy"


# ----- the steps with a server that cheats ---------------------------------------------


def _announced(names: tuple[str, ...] = NAMES, run: str = "run/1") -> list[CeremonyParty]:
    parties = [CeremonyParty(n, params=PARAMS) for n in names]
    xs = {n: i + 1 for i, n in enumerate(names)}
    members = [p.announce(run=run, abscissae=xs, threshold=2) for p in parties]
    for p in parties:
        p._members = members  # type: ignore[attr-defined]  # kept for the tests below
    return parties


def _roster(parties: list[CeremonyParty]) -> tuple[mp.Roster, dict[str, bytes]]:
    members = tuple(parties[0]._members)  # type: ignore[attr-defined]
    roster = mp.Roster(run="run/1", threshold=2, params=PARAMS, members=members)
    return roster, {p.name: p.kex_public for p in parties}


def test_steps_in_process_make_parties_that_match_the_roster() -> None:
    parties = _announced()
    roster, kex = _roster(parties)
    sigs = {p.name: p.sign_roster(roster, kex) for p in parties}
    dealt = {p.name: p.deal(sigs) for p in parties}
    done = [p.finish({d: dealt[d][p.name] for d in dealt if d != p.name}) for p in parties]
    assert [d.roster.digest for d in done] == [roster.digest] * 3


def test_a_roster_with_another_key_for_a_party_is_refused_by_that_party() -> None:
    parties = _announced()
    roster, kex = _roster(parties)
    swapped = {**kex, "node-b": CeremonyParty("server", params=PARAMS).kex_public}
    with pytest.raises(KeygenAborted, match="node-b: the roster does not hold"):
        parties[1].sign_roster(roster, swapped)


def test_different_rosters_shown_to_different_parties_stop_the_deal() -> None:
    """The server shows node-a a roster where node-b's X25519 key is its own: node-a
    signs it, node-b and node-c sign the true one; node-a's deal finds node-b's signature
    over another transcript and seals nothing."""
    parties = _announced()
    roster, kex = _roster(parties)
    server_kex = CeremonyParty("server", params=PARAMS)
    sig_a = parties[0].sign_roster(roster, {**kex, "node-b": server_kex.kex_public})
    sigs = {"node-a": sig_a, **{p.name: p.sign_roster(roster, kex) for p in parties[1:]}}
    with pytest.raises(KeygenAborted, match="'node-b' did not sign the roster this party signed"):
        parties[0].deal(sigs)
    with pytest.raises(KeygenAborted, match="'node-a' did not sign"):
        parties[1].deal(sigs)


def test_an_altered_or_misrouted_sealed_share_aborts_naming_the_dealer() -> None:
    parties = _announced()
    roster, kex = _roster(parties)
    sigs = {p.name: p.sign_roster(roster, kex) for p in parties}
    dealt = {p.name: p.deal(sigs) for p in parties}
    c = parties[2]
    flipped = bytearray(dealt["node-a"]["node-c"])
    flipped[100] ^= 1
    with pytest.raises(KeygenAborted, match="from 'node-a' does not open"):
        c.finish({"node-a": bytes(flipped), "node-b": dealt["node-b"]["node-c"]})
    with pytest.raises(KeygenAborted, match="from 'node-a' does not open"):  # node-b's share
        parties[2].finish({"node-a": dealt["node-a"]["node-b"], "node-b": b""})


def test_a_sealed_share_opens_only_for_its_run_dealer_and_recipient() -> None:
    recipient = CeremonyParty("node-b", params=PARAMS)
    n = PARAMS.ckks.data_prime_count * PARAMS.ckks.poly_modulus_degree * 8
    packet = mp.SharePacket("node-a", "node-b", os.urandom(32), os.urandom(n))
    sealed = seal_share(packet, run="run/1", recipient_key=recipient.kex_public)
    opened = open_share(
        sealed, run="run/1", dealer="node-a", recipient="node-b", key=recipient._kex, params=PARAMS
    )
    assert opened == packet
    for run, dealer, rec in (("run/2", "node-a", "node-b"), ("run/1", "node-c", "node-b")):
        with pytest.raises(KeygenAborted, match="does not open"):
            open_share(
                sealed, run=run, dealer=dealer, recipient=rec, key=recipient._kex, params=PARAMS
            )
    with pytest.raises(KeygenAborted, match="is not"):
        open_share(
            sealed[:-1],
            run="run/1",
            dealer="node-a",
            recipient="node-b",
            key=recipient._kex,
            params=PARAMS,
        )


def test_an_announcement_is_parsed_strictly() -> None:
    member = _announced()[0]._members[0]  # type: ignore[attr-defined]
    record = member_to_record(member)
    assert member_from_record(record, recipients=NAMES) == member
    bad = [
        {**record, "name": "../x"},
        {**record, "x": 0},
        {**record, "verify-key": b"x" * 31},
        {**record, "commitments": record["commitments"][:2]},  # type: ignore[index]
        {**record, "commitment-names": ["node-a", "node-a", "node-b"]},
    ]
    for rec in bad:
        with pytest.raises(ValueError):
            member_from_record(rec, recipients=NAMES)


def test_a_party_checks_the_parameters_and_abscissae_it_is_shown() -> None:
    parties = _announced()
    roster, kex = _roster(parties)
    other = dataclasses.replace(PARAMS, max_rounds=PARAMS.max_rounds * 2)
    with pytest.raises(KeygenAborted, match="node-a: the roster does not hold"):
        parties[0].sign_roster(dataclasses.replace(roster, params=other), kex)


def test_keygen_for_multiparty_says_where_the_ceremony_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert main(["keygen", "--encryption-backend", "ckks-multiparty", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert (
        line.count("\n") == 1
        and "`fedtune deploy run` runs over the federation before round 1" in line
    )
    assert not out.exists()


def _ask(state: Path, step: str, **fields: object) -> RecordDict:
    return node_ceremony.ceremony_reply(
        RecordDict({"ceremony": ConfigRecord({"step": step, **fields})}),  # type: ignore[dict-item]
        name="node-a",
        state_dir=state,
        run_config=RUNNING,
        node_config={},
        run_name="strict",
        peers="any",
        node_key=state / "no-key-needed-before-announce",
    )


RUNNING = {"encryption": True, "encryption-backend": "ckks-multiparty"}


def test_a_node_parses_each_ceremony_message_strictly(tmp_path: Path) -> None:
    """Wrong types, counts and sizes are `bad-request`; steps out of order, or after a
    restart (no ceremony state), are `keygen-aborted`; neither carries a text."""
    with pytest.raises(NodeRefusal, match="keygen-aborted"):
        _ask(tmp_path, "deal", names=["node-a"], signatures=[b"x" * 64])  # no hello first
    assert len(_ask(tmp_path, "hello").config_records["ceremony"]["kex-key"]) == 32
    malformed = [
        ("announce", {"run": "r", "threshold": 1, "names": ["node-a"], "abscissae": [1, 2]}),
        ("announce", {"run": "r", "threshold": 1, "names": ["node-a"] * 65, "abscissae": [1]}),
        ("announce", {"run": 5, "threshold": 1, "names": ["node-a"], "abscissae": [1]}),
        ("roster", {"roster": "not bytes"}),
        ("deal", {"names": ["node-a"], "signatures": [b"x" * 63]}),
        ("receive", {"dealers": ["node-b"], "packets": [b"x" * 10]}),
        ("nonsense", {}),
    ]
    for step, fields in malformed:
        with pytest.raises(ValueError) as info:
            _ask(tmp_path, step, **fields)
        assert code_of(info.value) == "bad-request", (step, info.value)
    with pytest.raises(NodeRefusal, match="keygen-aborted"):  # a roster that does not parse
        _ask(tmp_path, "roster", roster=b"{}", **{"kex-names": ["a"], "kex-keys": [b"k" * 32]})


def test_a_multiparty_deployment_needs_no_public_context_and_nodes_no_secret(
    tmp_path: Path,
) -> None:
    """`fedtune deploy run` submits without `public-context` (the ceremony makes it); a
    node without `secret-context` opens its own party file of the run's ceremony."""
    flat = run_config(
        {"label-names": "a,b", "encryption": True, "encryption-backend": "ckks-multiparty"},
        run_dir=tmp_path / "run",
    )
    assert "public-context" not in flat
    merged: dict[str, object] = {**RUNNING, "state-dir": str(tmp_path), "run-id": "r9"}
    node_ceremony.use_party_file(merged, {}, run_id=3, name="node-a", deployed=True)
    assert str(merged["secret-context"]).endswith("multiparty/none/node-a.party")  # no ceremony yet
    shared = dict(merged, **{"secret-context": "x"})
    node_ceremony.use_party_file(shared, {"secret-context": "x"}, run_id=3, name="a", deployed=True)
    assert shared["secret-context"] == "x"  # a node with its own (shared) key keeps it


def test_a_node_that_lies_or_refuses_stops_the_ceremony_naming_it(
    tmp_path: Path, node_keys: Path
) -> None:
    nodes = {i + 1: _node(n, tmp_path / n, [], keys=node_keys) for i, n in enumerate(NAMES)}

    def liar(msg: Message) -> Message:
        reply = nodes[2](msg)
        if not reply.has_error() and "x" in reply.content.config_records["ceremony"]:
            reply.content.config_records["ceremony"]["x"] = 3  # node-c's abscissa
        return reply

    grid = InProcessGrid({**nodes, 2: liar})
    with pytest.raises(FederationError, match="step 'announce': node 2 answered another"):
        run_ceremony(grid, num_clients=3, run="r1", keys_dir=tmp_path / "k", timeout=5)

    def refuser(msg: Message) -> Message:
        return Message(Error(code=2, reason="keygen-aborted"), reply_to=msg)

    grid = InProcessGrid({**nodes, 3: refuser})
    with pytest.raises(FederationError, match="step 'hello': node 3: keygen-aborted"):
        run_ceremony(grid, num_clients=3, run="r1", keys_dir=tmp_path / "k", timeout=5)
    assert not (tmp_path / "k" / "public.ctx").exists()


# ----- the roster is the data owners' (pinned peers), not the server's -----------------


def _dealt_nothing(traffic: list[RecordDict]) -> bool:
    return not any("packets" in c.config_records.get("ceremony", {}) for c in traffic)


def test_a_sybil_the_server_adds_is_refused_by_every_honest_node_before_a_deal(
    tmp_path: Path, node_keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server enrols a member of its own (its own node key, trusting any roster):
    every honest node refuses the roster (`policy:peers`), naming the sybil in its log,
    and no share is sealed by anyone."""
    traffic: list[RecordDict] = []
    nodes = {i + 1: _node(n, tmp_path / n, traffic, keys=node_keys) for i, n in enumerate(NAMES)}
    nodes[4] = _node("sybil", tmp_path / "sybil", traffic, keys=node_keys, peers="any")
    with pytest.raises(FederationError, match="step 'roster'") as info:
        run_ceremony(
            InProcessGrid(nodes), num_clients=4, run="r1", keys_dir=tmp_path / "k", timeout=5
        )
    for node in (1, 2, 3):
        assert f"node {node}: policy:peers" in str(info.value)
    assert "node 4" not in str(info.value)  # the server's own member signed
    assert _dealt_nothing(traffic)
    assert "roster member 'sybil'" in caplog.text and "pinned peers" in caplog.text
    assert not list(tmp_path.rglob("*.party"))


def test_a_node_without_pins_refuses_and_one_with_any_proceeds(
    tmp_path: Path, node_keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = {i + 1: _node(n, tmp_path / n, [], keys=node_keys) for i, n in enumerate(NAMES)}
    grid = InProcessGrid(
        {**nodes, 1: _node("node-a", tmp_path / "a0", [], keys=node_keys, peers="")}
    )
    with pytest.raises(FederationError, match="step 'hello': node 1: policy:peers"):
        run_ceremony(grid, num_clients=3, run="r1", keys_dir=tmp_path / "k", timeout=5)
    assert "this node pinned no peers" in caplog.text
    # node-a trusts the server's roster; node-b and node-c pinned the other two
    grid = InProcessGrid(
        {**nodes, 1: _node("node-a", tmp_path / "a", [], keys=node_keys, peers="any")}
    )
    public = run_ceremony(grid, num_clients=3, run="r1", keys_dir=tmp_path / "k", timeout=30)
    assert files.load_roster(public.parent / "roster.json").threshold == 2


def test_a_forged_announcement_signature_is_refused(
    tmp_path: Path, node_keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server signs node-b's announcement with a key of its own (in node-b's place)
    in the roster message it shows node-a; node-a refuses, naming node-b."""
    traffic: list[RecordDict] = []
    nodes = {i + 1: _node(n, tmp_path / n, traffic, keys=node_keys) for i, n in enumerate(NAMES)}
    honest_a = nodes[1]

    def shown_a_forgery(msg: Message) -> Message:
        record = msg.content.config_records["ceremony"]
        if record["step"] == "roster":
            sigs = list(record["node-signatures"])  # type: ignore[arg-type]
            sigs[1] = bytes(sigs[1][:-1]) + bytes([sigs[1][-1] ^ 1])  # type: ignore[index]
            record["node-signatures"] = sigs
        return honest_a(msg)

    grid = InProcessGrid({**nodes, 1: shown_a_forgery})
    with pytest.raises(FederationError, match="step 'roster': node 1: policy:peers"):
        run_ceremony(grid, num_clients=3, run="r1", keys_dir=tmp_path / "k", timeout=5)
    assert "roster member 'node-b'" in caplog.text and "did not sign" in caplog.text
    assert _dealt_nothing(traffic)


def test_the_server_names_a_node_whose_announcement_its_key_did_not_sign(
    tmp_path: Path, node_keys: Path
) -> None:
    nodes = {i + 1: _node(n, tmp_path / n, [], keys=node_keys) for i, n in enumerate(NAMES)}

    def unsigned(msg: Message) -> Message:
        reply = nodes[2](msg)
        if not reply.has_error() and "node-signature" in reply.content.config_records["ceremony"]:
            reply.content.config_records["ceremony"]["node-signature"] = b"\x30" * 70
        return reply

    with pytest.raises(FederationError, match="node 2 answered an announcement its node key"):
        run_ceremony(
            InProcessGrid({**nodes, 2: unsigned}),
            num_clients=3,
            run="r1",
            keys_dir=tmp_path / "k",
            timeout=5,
        )


def test_check_roster_refuses_an_unpinned_a_doubled_or_a_foreign_own_key(node_keys: Path) -> None:
    keys = {n: identity.read_node_key(node_keys / n) for n in (*NAMES, "sybil")}
    pub = {n: identity.public_of(k) for n, k in keys.items()}
    digest = b"d" * 48

    def entry(name: str, signer: str | None = None) -> tuple[str, bytes, bytes]:
        return pub[signer or name], identity.sign(keys[signer or name], digest), digest

    pins = (pub["node-b"], pub["node-c"])
    good = {n: entry(n) for n in NAMES}
    identity.check_roster(me="node-a", my_key=pub["node-a"], pins=pins, members=good)
    bad = [
        ({**good, "sybil": entry("sybil")}, "'sybil'.*pinned peers"),
        ({**good, "node-d": entry("node-c")}, "'node-d'.*also 'node-c'"),
        ({**good, "node-a": entry("node-b")}, "'node-a'.*this node's own key"),
        ({**good, "node-b": (pub["node-b"], good["node-c"][1], digest)}, "'node-b'.*did not"),
    ]
    for members, match in bad:
        with pytest.raises(PolicyError, match=match) as info:
            identity.check_roster(me="node-a", my_key=pub["node-a"], pins=pins, members=members)
        assert code_of(info.value) == "policy:peers"
    with_sybil = {**good, "sybil": entry("sybil")}
    identity.check_roster(me="node-a", my_key=pub["node-a"], pins="any", members=with_sybil)


def test_peers_in_the_node_policy_file_and_on_the_command_line(
    tmp_path: Path, node_keys: Path
) -> None:
    b = identity.read_public_key(node_keys / "node-b.pub")
    assert b.startswith("ecdsa-sha2-nistp384 ") and "node-b" not in b  # comment dropped
    for peers in ((b,), "any"):
        policy = load_policy(None, {"peers": json.dumps(list(peers)) if peers != "any" else peers})
        write_policy(tmp_path, policy)
        assert load_policy(tmp_path).peers == peers
    assert load_policy(tmp_path / "none").peers == ()
    with pytest.raises(PolicyError, match="not a node public key"):
        load_policy(None, {"peers": json.dumps(["ssh-ed25519 AAAAC3Nz x"])})
    args = argparse.Namespace(peer=["any", str(node_keys / "node-b.pub")])
    with pytest.raises(ConfigError, match="--peer any trusts the server's roster"):
        policy_settings(args)
    args.peer = [str(node_keys / "node-b.pub"), str(node_keys / "node-c.pub")]
    assert len(policy_settings(args)["peers"]) == 2  # type: ignore[arg-type]
    (node_keys / "pub").write_bytes((node_keys / "node-b.pub").read_bytes())
    (node_keys / "pub").chmod(0o600)
    with pytest.raises(ConfigError, match="is not a node key"):
        identity.read_node_key(node_keys / "pub")
    (node_keys / "open").write_bytes((node_keys / "node-b").read_bytes())
    (node_keys / "open").chmod(0o644)
    with pytest.raises(ConfigError, match="open to other users"):
        identity.read_node_key(node_keys / "open")
    (node_keys / "link").symlink_to(node_keys / "node-b")
    with pytest.raises(ConfigError, match="symbolic link"):
        identity.read_node_key(node_keys / "link")
