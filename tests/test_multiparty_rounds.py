"""Multiparty CKKS rounds (fedtune.secure.multiparty.rounds, docs/multiparty.md).

Three clients, two rounds, in one process: each client encrypts its update under its own
key and signs it, the server adds with the unchanged ``ckks`` codec on the public context
and asks a quorum for signed partial decryptions, every client combines the global itself
from what travels in the ``global`` record. The result is compared with a plain run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord

from fedtune.errors import GlobalRefused
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.multiparty import protocol as mp
from fedtune.secure.multiparty import rounds
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.plain import PlainCodec
from fedtune.secure.verify import C1_MISMATCH, MALFORMED, receipts_to_record

LENGTH = 257
PARAMS = MultipartyParams()
NAMES = ["client-0", "client-1", "client-2"]
EXAMPLES = {"client-0": 3, "client-1": 5, "client-2": 4}


def _local_update(name: str, global_vec: np.ndarray, rnd: int) -> np.ndarray:
    """A deterministic stand-in for local training: ``w_k`` from the global."""
    rng = np.random.default_rng([NAMES.index(name), rnd])
    return 0.9 * global_vec + rng.normal(size=LENGTH)


def _plain_run(num_rounds: int) -> np.ndarray:
    codec = PlainCodec(length=LENGTH)
    vec = np.zeros(LENGTH)
    for rnd in range(1, num_rounds + 1):
        ups = [codec.encode(EXAMPLES[n] * _local_update(n, vec, rnd)) for n in NAMES]
        vec = codec.decode(codec.add(ups)) / sum(EXAMPLES.values())
    return vec


@pytest.fixture(scope="module")
def run():
    """A 3-client, 2-round multiparty run; each round's record and opened globals kept."""
    roster, parties_list = mp.ceremony(NAMES, run="run-e2e", threshold=2, params=PARAMS)
    parties = {p.name: p for p in parties_list}
    public = mp.public_context(roster)
    server = CkksCodec(public, length=LENGTH)
    min_count = 2
    globals_seen: dict[str, np.ndarray] = {n: np.zeros(LENGTH) for n in NAMES}
    history = []
    for rnd in (1, 2):
        uploads, receipts = [], []
        for name in NAMES:
            party = parties[name]
            upload = party.encrypt(EXAMPLES[name] * _local_update(name, globals_seen[name], rnd))
            sig = party.sign(upload, server_round=rnd, num_examples=EXAMPLES[name])
            checked = server.validate(upload)  # the server: validate, receipt, add
            uploads.append(checked)
            receipts.append(
                mp.make_receipt(public, checked, sig, name=name, num_examples=EXAMPLES[name])
            )
        total = server.add(uploads)
        n_total = sum(EXAMPLES.values())
        request, partials = rounds.decryption_round(
            roster,
            server_round=rnd,
            receipts=receipts,
            num_examples=n_total,
            quorum=NAMES[:2],  # t = 2 of 3
            ask=lambda name, req: rounds.answer(parties[name], req, min_count=min_count),
        )
        # What the next message's ``global`` record carries; through Flower's record type.
        record = ConfigRecord(
            {
                **total,
                "num-examples": n_total,
                **receipts_to_record(receipts),
                **rounds.partials_to_record(request, partials),
            }
        )
        for name in NAMES:  # every client combines itself
            listed = tuple(receipts)
            req, got = rounds.partials_from_record(
                roster, record, receipts=listed, num_examples=n_total
            )
            payload = {k: record[k] for k in ("chunks", "length", "fingerprint")}
            opened = rounds.open_global(roster, payload, req, got, min_count=min_count)
            globals_seen[name] = opened / n_total
        history.append({"record": record, "receipts": tuple(receipts), "total": total})
    return {
        "roster": roster,
        "parties": parties,
        "globals": globals_seen,
        "history": history,
        "min_count": min_count,
    }


def test_multiparty_run_matches_the_plain_run(run):
    plain = _plain_run(2)
    # Each round's sum carries t = 2 holders' smudging (sd per value on the sum), divided by N.
    sd = PARAMS.decoded_error_std(2) / sum(EXAMPLES.values())
    for name in NAMES:
        err = np.abs(run["globals"][name] - plain).max()
        assert err < 20 * sd, (name, err, sd)
    # All clients computed the same global (they combine the same signed bytes).
    assert np.array_equal(run["globals"]["client-0"], run["globals"]["client-2"])


def _opened(run, record, *, receipts=None, num_examples=None):
    last = run["history"][-1]
    items = last["receipts"] if receipts is None else receipts
    n = record["num-examples"] if num_examples is None else num_examples
    req, got = rounds.partials_from_record(run["roster"], record, receipts=items, num_examples=n)
    payload = {k: record[k] for k in ("chunks", "length", "fingerprint")}
    return rounds.open_global(run["roster"], payload, req, got, min_count=run["min_count"])


def test_a_forged_global_is_refused(run):
    """The server cannot make clients use a global of its choosing."""
    record = dict(run["history"][-1]["record"])
    assert np.isfinite(_opened(run, record)).all()  # the genuine one opens
    roster = run["roster"]

    # 1. A partial replaced by the server's own polynomial (it wants C0 + d to be its value).
    chunks = list(record["mp-partial-chunks"])
    chunks[0] = bytes(len(chunks[0]))
    with pytest.raises(GlobalRefused, match=rounds.BAD_PARTIAL):
        _opened(run, {**record, "mp-partial-chunks": chunks})

    # 2. Partials signed with a key that is not the holder's roster key.
    forger = Ed25519PrivateKey.generate()
    req, got = rounds.partials_from_record(
        roster, record, receipts=run["history"][-1]["receipts"], num_examples=record["num-examples"]
    )
    forged = [
        rounds.SignedPartial(s.partial, forger.sign(rounds._message(roster, s.partial)))
        for s in got
    ]
    payload = {k: record[k] for k in ("chunks", "length", "fingerprint")}
    with pytest.raises(GlobalRefused, match=rounds.BAD_PARTIAL):
        rounds.open_global(roster, payload, req, forged, min_count=run["min_count"])

    # 3. No partials at all: a multiparty global is never used without them.
    bare = {k: v for k, v in record.items() if k not in rounds.RECORD_KEYS}
    with pytest.raises(GlobalRefused, match=rounds.NO_PARTIALS):
        _opened(run, bare)

    # 4. Round 1's genuine partials passed off with round 2's sum: signed for another request.
    first = run["history"][0]["record"]
    mixed = {**record, **{k: first[k] for k in rounds.RECORD_KEYS}}
    with pytest.raises(GlobalRefused):
        _opened(run, mixed)

    # 5. Another sum (round 1's ciphertext) under round 2's receipts and partials: c1 check.
    swapped = {**record, "chunks": first["chunks"]}
    with pytest.raises(GlobalRefused, match=C1_MISMATCH):
        _opened(run, swapped)

    # 6. Fewer receipts than min-clients, or ill-typed fields: refused before any work.
    with pytest.raises(GlobalRefused, match=MALFORMED):
        _opened(run, {**record, "mp-partial-signatures": ["x", "y"]})


def test_a_holder_signs_only_verified_requests(run):
    """A request with a forged receipt gets no partial (so no signed partial to forge with)."""
    parties = {n: dataclasses.replace(p, used={}) for n, p in run["parties"].items()}
    receipts = list(run["history"][-1]["receipts"])
    receipts[0] = dataclasses.replace(receipts[0], num_examples=receipts[0].num_examples + 1)
    req = mp.DecryptionRequest(
        3, tuple(receipts), sum(r.num_examples for r in receipts), ("client-0", "client-1")
    )
    with pytest.raises(GlobalRefused, match="bad-tags:0"):
        rounds.answer(parties["client-0"], req, min_count=2)


def test_export_opens_the_checkpointed_round_without_a_key(run):
    """Export: the last round's sum and its kept signed partials; no party file needed."""
    last = run["history"][-1]
    record = last["record"]
    vec = rounds.open_checkpoint(
        run["roster"],
        {k: record[k] for k in ("chunks", "length", "fingerprint")},
        record,
        receipts=last["receipts"],
        num_examples=record["num-examples"],
        min_count=run["min_count"],
    )
    assert np.array_equal(vec, run["globals"]["client-1"])


def test_a_node_opens_only_a_global_with_the_quorums_signed_partials(tmp_path):
    """The node-side path (fedtune.node.verified -> multiparty.node), on key files."""
    from flwr.app import RecordDict

    from fedtune.crypto import CryptoError
    from fedtune.secure import get_backend
    from fedtune.secure.multiparty import node
    from fedtune.secure.multiparty.backend import write_keys
    from fedtune.secure.verify import UsedGlobals, make_receipt

    write_keys(tmp_path / "keys", NAMES, run="run-node", threshold=2)
    backend = get_backend("ckks-multiparty")
    codecs = {
        n: backend.codec(length=LENGTH, context=tmp_path / "keys" / f"{n}.party") for n in NAMES
    }
    server = backend.codec(length=LENGTH, context=tmp_path / "keys" / "public.ctx", public=True)
    uploads, items = [], []
    for n in NAMES:
        signed = node.sign(
            codecs[n], codecs[n].encode(np.full(LENGTH, 1.0)), server_round=1, num_examples=2
        )
        body = {k: v for k, v in signed.items() if k != "tag"}
        payload = server.validate(body)
        uploads.append(payload)
        items.append(make_receipt(server, payload, signed["tag"], name=n, num_examples=2))
    total = server.add(uploads)
    decrypt = {**receipts_to_record(items), "num-examples": 6, "mp-round": 1}
    decrypt["mp-quorum"] = NAMES[:2]

    def ask(name, request):
        reply = node.partial_reply(
            codecs[name],
            RecordDict({"decrypt": ConfigRecord(decrypt)}),
            min_count=2,
            rounds_dir=tmp_path / "rounds" / name,
        )
        rec = reply.config_records["partial"]
        p = mp.PartialDecryption(rec["name"], request.digest(server.roster), tuple(rec["chunks"]))
        return rounds.SignedPartial(p, rec["signature"])

    request, partials = rounds.decryption_round(
        server.roster, server_round=1, receipts=items, num_examples=6, quorum=NAMES[:2], ask=ask
    )
    record = {**decrypt, **rounds.partials_to_record(request, partials)}
    holder = codecs["client-2"]
    with pytest.raises(CryptoError):
        holder.decode(total)  # nothing opened yet: one party's codec never decrypts alone
    forged = dict(record)
    forged["mp-partial-signatures"] = [bytes(64)] * 2
    used = UsedGlobals(None)
    kw = {"run": "r", "server_round": 1, "min_count": 2, "used": used}
    with pytest.raises(GlobalRefused, match=rounds.BAD_PARTIAL):
        node.open_record(holder, forged, total, 6, **kw)
    node.open_record(holder, record, total, 6, **kw)
    assert np.abs(holder.decode(total) - 3.0).max() < 1e-3
    # Another sum (of two uploads) under these receipts and partials: the c1 check.
    with pytest.raises(GlobalRefused, match=C1_MISMATCH):
        node.open_record(holder, record, server.add(uploads[:2]), 6, **kw)


def test_unwired_paths_refuse_with_one_line_naming_the_backend(tmp_path):
    """``make_keys`` (keygen) is not wired: ConfigError naming the key. A resume without
    a checkpoint or a saved decryption request says there is nothing to resume."""
    import types

    from fedtune.apps.server.loop import resume_round
    from fedtune.errors import ConfigError
    from fedtune.run.checkpoint import CheckpointError
    from fedtune.secure import get_backend
    from fedtune.secure.multiparty.backend import write_keys

    write_keys(tmp_path / "keys", NAMES, run="run-x", threshold=2)
    backend = get_backend("ckks-multiparty")
    server = backend.codec(length=LENGTH, context=tmp_path / "keys" / "public.ctx", public=True)
    with pytest.raises(CheckpointError, match="Cannot resume"):
        resume_round(tmp_path, types.SimpleNamespace(codec=server), resume=True)
    with pytest.raises(ConfigError, match="encryption-backend"):
        backend.make_keys(tmp_path / "other")
