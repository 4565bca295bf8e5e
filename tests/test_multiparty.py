"""Multiparty CKKS (fedtune.secure.multiparty, docs/multiparty.md).

A tiny federation in one process: three parties run the ceremony, encrypt, sign, the
server validates and adds with the unchanged ``ckks`` codec on the public context, a
quorum partially decrypts, the server combines.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedtune.crypto import PayloadError
from fedtune.secure import get_backend
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.multiparty import protocol as mp
from fedtune.secure.multiparty import ring
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.secure.verify import BAD_TAGS, REPLACED, TOO_FEW, GlobalRefused

LENGTH = 5000  # one chunk (N = 8192 values per ciphertext)
PARAMS = MultipartyParams()


@pytest.fixture(scope="module")
def federation():
    """Three parties, threshold 2, and round 1's uploads, receipts and sum."""
    roster, parties = mp.ceremony(["a", "b", "c"], run="run-1", threshold=2, params=PARAMS)
    public = mp.public_context(roster)
    server = CkksCodec(public, length=LENGTH)
    rng = np.random.default_rng(7)
    values = [rng.normal(size=LENGTH) * 10 for _ in parties]
    uploads, receipts = [], []
    for party, x in zip(parties, values, strict=True):
        payload = server.validate(party.encrypt(x))  # the server's check, unchanged
        sig = party.sign(payload, server_round=1, num_examples=4)
        uploads.append(payload)
        receipts.append(mp.make_receipt(public, payload, sig, name=party.name, num_examples=4))
    return {
        "roster": roster,
        "parties": {p.name: p for p in parties},
        "public": public,
        "server": server,
        "values": values,
        "uploads": uploads,
        "receipts": tuple(receipts),
        "sum": server.add(uploads),
    }


def _request(fed, quorum, server_round=1, receipts=None):
    items = fed["receipts"] if receipts is None else receipts
    return mp.DecryptionRequest(
        server_round, items, sum(r.num_examples for r in items), tuple(quorum)
    )


def _fresh_parties(fed):
    """The parties with empty round logs (each test its own rounds)."""
    return {n: dataclasses.replace(p, used={}) for n, p in fed["parties"].items()}


def test_ntt_is_seals_known_answer(federation):
    """SEAL's own secret key, out of NTT form, is ternary; NTT products are negacyclic ones."""
    party = federation["parties"]["a"]
    ctx = party.dealer.context
    layout = federation["public"].layout
    key = mp._key_ntt(ctx)
    coeffs = ring.from_ntt(federation["public"], key[None])[0]
    for i, q in enumerate(layout.primes):
        assert set(np.unique(coeffs[i]).tolist()) <= {0, 1, q - 1}
    assert np.array_equal(coeffs[0] == 1, coeffs[1] == 1)  # the same integers mod each prime
    assert np.array_equal(ring.to_ntt(federation["public"], coeffs[None])[0], key)
    # independent check: f * (x^3 - 2) computed by hand in coefficient form
    n = layout.poly_modulus_degree
    f = ring.uniform(layout, rng=np.random.default_rng(1))
    g = np.zeros_like(f)
    g[:, 3] = 1
    for i, q in enumerate(layout.primes):
        g[i, 0] = q - 2
    ntt = ring.to_ntt(federation["public"], np.stack([f, g]))
    prod = ring.from_ntt(federation["public"], ring.mul(layout, ntt[0], ntt[1])[None])[0]
    for i, q in enumerate(layout.primes):
        fi = [int(v) for v in f[i]]
        shifted = [(-fi[n - 3 + j]) % q for j in range(3)] + fi[: n - 3]  # x^3 f, negacyclic
        expected = [(s - 2 * v) % q for s, v in zip(shifted, fi, strict=True)]
        assert [int(v) for v in prod[i]] == expected


def test_quorum_decrypts_the_sum(federation):
    parties = _fresh_parties(federation)
    req = _request(federation, ["a", "b", "c"])
    partials = [parties[n].partial(req, min_count=2) for n in req.quorum]
    out = mp.combine(federation["roster"], federation["sum"], req, partials)
    err = np.abs(out - np.sum(federation["values"], axis=0)).max()
    assert err < 8 * PARAMS.decoded_error_std(3), err


def test_round_survives_a_dropped_key_holder(federation):
    """t-of-n: c vanished after uploading; a and b decrypt the sum that includes c."""
    parties = _fresh_parties(federation)
    req = _request(federation, ["a", "b"])
    partials = [parties[n].partial(req, min_count=2) for n in req.quorum]
    out = mp.combine(federation["roster"], federation["sum"], req, partials)
    assert np.abs(out - np.sum(federation["values"], axis=0)).max() < 1e-3


def test_one_partial_alone_is_noise(federation):
    """C0 plus a single key holder's partial decodes to values unrelated to the sum."""
    parties = _fresh_parties(federation)
    req = _request(federation, ["a", "b"])
    partial = parties["a"].partial(req, min_count=2)
    d_a = mp._parse_partial(federation["public"], partial, 1, smudging_bits=PARAMS.smudging_bits)[0]
    public = federation["public"]
    from fedtune.crypto._seal import scratch_dir
    from fedtune.crypto.payload import full_coefficients

    with scratch_dir() as tmp:
        c0 = full_coefficients(public, federation["sum"]["chunks"][0], field="s", directory=tmp)[0]
    guess = ring.decode_plaintext(public, ring.add(public.layout, c0, d_a))[:LENGTH]
    err = np.abs(guess - np.sum(federation["values"], axis=0))
    assert np.median(err) > 1e5  # uniform mod q: values of order q / scale = 2^26


def test_attacker_with_one_share_and_all_traffic_cannot_read_an_upload(federation):
    """One key holder's shares + the server's state + round traffic: no single upload;
    the threshold's worth of shares (a quorum colluding) can."""
    parties = _fresh_parties(federation)
    public, layout = federation["public"], federation["public"].layout
    roster = federation["roster"]
    req = _request(federation, ["a", "b"])
    traffic = [parties[n].partial(req, min_count=2) for n in req.quorum]  # seen by the server
    assert traffic  # (part of what the attacker holds; it only sums to the whole round)
    victim = 2  # party c's upload
    from fedtune.crypto import receipts as rc
    from fedtune.crypto._seal import scratch_dir
    from fedtune.crypto.payload import full_coefficients

    with scratch_dir() as tmp:
        c0, c1 = full_coefficients(
            public, federation["uploads"][victim]["chunks"][0], field="u", directory=tmp
        )
        assert np.array_equal(c1, rc._expand(public, federation["receipts"][victim].seeds, tmp))
    truth = federation["values"][victim]

    def decrypt_with(holders):
        xs = [roster.member(h).x for h in holders]
        key = np.zeros_like(c0)
        for h, x in zip(holders, xs, strict=True):
            lam = ring.lagrange_at_zero(layout, x, xs)
            key = ring.add(layout, key, ring.scale(layout, parties[h].shares["c"], lam))
        plain = ring.add(layout, c0, ring.mul(layout, c1, key))
        return ring.decode_plaintext(public, plain)[:LENGTH]

    assert np.median(np.abs(decrypt_with(["a"]) - truth)) > 1e5  # one share: noise
    assert np.abs(decrypt_with(["a", "b"]) - truth).max() < 1e-6  # a quorum: the upload


def test_second_request_in_a_round_is_refused(federation):
    """The server cannot obtain two decryptions of one round from a key holder."""
    parties = _fresh_parties(federation)
    full = _request(federation, ["a", "b"])
    first = parties["a"].partial(full, min_count=2)
    again = parties["a"].partial(full, min_count=2)
    assert again.chunks == first.chunks  # the same bytes, no fresh noise to average
    fewer = _request(federation, ["a", "b"], receipts=federation["receipts"][:2])
    with pytest.raises(GlobalRefused) as err:
        parties["a"].partial(fewer, min_count=2)
    assert err.value.code == REPLACED
    other_quorum = _request(federation, ["a", "c"])
    with pytest.raises(GlobalRefused, match=REPLACED):
        parties["a"].partial(other_quorum, min_count=2)


def test_unverified_sums_are_refused(federation):
    parties = _fresh_parties(federation)
    items = federation["receipts"]
    with pytest.raises(GlobalRefused, match=TOO_FEW):
        parties["a"].partial(_request(federation, ["a", "b"], receipts=items[:1]), min_count=2)
    # the server relabels c's upload as b's: the signature is c's, not b's
    forged = (items[0], dataclasses.replace(items[2], name="b"))
    with pytest.raises(GlobalRefused, match=BAD_TAGS):
        parties["a"].partial(_request(federation, ["a", "b"], receipts=forged), min_count=2)
    # an upload signed for round 1 does not count in round 2
    with pytest.raises(GlobalRefused, match=BAD_TAGS):
        parties["a"].partial(_request(federation, ["a", "b"], server_round=2), min_count=2)
    with pytest.raises(GlobalRefused, match=mp.QUORUM):
        parties["a"].partial(_request(federation, ["a"]), min_count=2)  # below threshold
    with pytest.raises(GlobalRefused, match=mp.NOT_IN_QUORUM):
        parties["a"].partial(_request(federation, ["b", "c"]), min_count=2)
    assert not parties["a"].used  # nothing was answered


def test_combine_refuses_a_sum_of_other_uploads(federation):
    parties = _fresh_parties(federation)
    req = _request(federation, ["a", "b"])
    partials = [parties[n].partial(req, min_count=2) for n in req.quorum]
    other = federation["server"].add(federation["uploads"][:2])  # c1 misses c's seed
    with pytest.raises(PayloadError, match="c1"):
        mp.combine(federation["roster"], other, req, partials)
    with pytest.raises(PayloadError, match="quorum"):
        mp.combine(federation["roster"], federation["sum"], req, partials[:1])


def test_commitment_mismatch_aborts_keygen():
    dealers = [mp.Dealer(n, run="r", params=PARAMS) for n in ("a", "b")]
    xs = {"a": 1, "b": 2}
    members = tuple(d.announce(xs, threshold=2) for d in dealers)
    roster = mp.Roster(run="r", threshold=2, params=PARAMS, members=members)
    good = dealers[0].packet_for("b")
    tampered = dataclasses.replace(good, share=bytes([good.share[0] ^ 1]) + good.share[1:])
    with pytest.raises(mp.KeygenAborted, match="'a' does not match the commitment"):
        dealers[1].finish(roster, [tampered, dealers[1].packet_for("b")])
    # a roster in which the server altered b's announcement is refused by b
    altered = dataclasses.replace(members[1], x=3)
    bad_roster = mp.Roster(run="r", threshold=2, params=PARAMS, members=(members[0], altered))
    with pytest.raises(mp.KeygenAborted, match="own announcement"):
        dealers[1].finish(bad_roster, [good, dealers[1].packet_for("b")])
    party = dealers[1].finish(roster, [good, dealers[1].packet_for("b")])
    assert set(party.shares) == {"a", "b"}


def test_smudging_parameters():
    p = MultipartyParams()
    assert p.smudging_bits == 74  # 40 + 13 + 10 + log2(B = 1041)
    assert p.decoded_error_std(3) < 5e-5
    with pytest.raises(ValueError, match="at least 40"):
        MultipartyParams(security_bits=32)


def test_backend_is_registered_by_name():
    backend = get_backend("ckks-multiparty")
    assert backend.name == "ckks-multiparty" and backend.uses_keys


def test_partial_packing_rounds_only_low_bits(federation):
    """A packed partial comes back within 2^(r-1) per coefficient; the fast CRT = the exact one."""
    public = federation["public"]
    layout = public.layout
    bits = PARAMS.smudging_bits
    d = ring.uniform(layout, rng=np.random.default_rng(3))
    back = ring.unpack_partial(
        public, ring.pack_partial(public, d, smudging_bits=bits), smudging_bits=bits
    )
    r, width = ring.rounding(layout, smudging_bits=bits)
    assert width == 7 and r <= bits - 8
    x = ring.crt_compose(layout, ring.from_ntt(public, d[None])[0])
    y = ring.crt_compose(layout, ring.from_ntt(public, back[None])[0])
    big_q = int(np.prod([int(q) for q in layout.primes], dtype=object))
    diff = (y - x) % big_q
    diff = np.where(diff > big_q // 2, diff - big_q, diff)
    assert max(abs(int(v)) for v in diff) <= 2 ** (r - 1)
    coeffs = ring.from_ntt(public, d[None])[0]
    fast = ring._round_two_primes(layout, coeffs, r)
    exact = (x + (1 << (r - 1))) >> r
    assert [int(v) for v in fast] == [int(v) for v in exact]


def test_threshold_must_be_a_majority():
    """t <= n/2 would let the server get two decryptions of one round from honest holders."""
    with pytest.raises(ValueError, match="more than half"):
        mp.Dealer("a", run="r", params=PARAMS).announce(
            {"a": 1, "b": 2, "c": 3, "d": 4}, threshold=2
        )


def test_server_gets_at_most_one_decryption_per_round(federation):
    """Verified-sums attack: the server shows different key holders different sums of one
    round (all uploads / all but c's, whose difference is c's upload). t = 2 of 3: every
    quorum for the second sum needs a holder that already answered the first."""
    parties = _fresh_parties(federation)
    full = _request(federation, ["a", "b"])
    without_c = _request(federation, ["a", "c"], receipts=federation["receipts"][:2])
    got = {}
    for holder, req in (("a", full), ("b", full), ("c", without_c)):
        got[holder] = parties[holder].partial(req, min_count=2)
    for holder in ("a", "b"):  # the second sum, asked of the holders that answered the first
        quorum = [holder, "c"]
        with pytest.raises(GlobalRefused, match=REPLACED):
            parties[holder].partial(
                _request(federation, quorum, receipts=federation["receipts"][:2]), min_count=2
            )
    roster = federation["roster"]
    out = mp.combine(roster, federation["sum"], full, [got["a"], got["b"]])
    assert np.abs(out - np.sum(federation["values"], axis=0)).max() < 1e-3
    partial_sum = federation["server"].add(federation["uploads"][:2])
    with pytest.raises(PayloadError, match="quorum"):  # c's answer alone is not a quorum
        mp.combine(roster, partial_sum, without_c, [got["c"]])


def test_malformed_requests_are_refused_before_any_work(federation):
    parties = _fresh_parties(federation)
    good = _request(federation, ["a", "b"])
    for bad in (
        dataclasses.replace(good, server_round="1"),
        dataclasses.replace(good, quorum=["a", "b"]),
        dataclasses.replace(good, receipts=list(good.receipts)),
        dataclasses.replace(good, receipts=(dataclasses.replace(good.receipts[0], tag=b"x" * 32),)),
    ):
        with pytest.raises(GlobalRefused, match="malformed"):
            parties["a"].partial(bad, min_count=1)
    assert not parties["a"].used


def test_party_files_round_trip_and_the_round_log_survives_a_restart(federation, tmp_path):
    from fedtune.secure.multiparty import files

    roster = federation["roster"]
    party = federation["parties"]["a"]
    files.save_roster(roster, tmp_path)
    path = files.save_party(party, tmp_path / "a")
    assert (path.stat().st_mode & 0o777) == 0o600
    loaded_roster = files.load_roster(tmp_path / "roster.json")
    assert loaded_roster.digest == roster.digest
    first = files.load_party(path, loaded_roster, rounds=tmp_path / "a" / "rounds")
    assert all(np.array_equal(first.shares[n], party.shares[n]) for n in party.shares)
    req = _request(federation, ["a", "b"])
    given = first.partial(req, min_count=2)
    restarted = files.load_party(path, loaded_roster, rounds=tmp_path / "a" / "rounds")
    assert restarted.partial(req, min_count=2).chunks == given.chunks  # same bytes
    with pytest.raises(GlobalRefused, match=REPLACED):
        restarted.partial(_request(federation, ["a", "c"]), min_count=2)
    # the party file of another roster, or with another party's signing key, is refused
    other_roster = dataclasses.replace(roster, threshold=3)
    with pytest.raises(files.FileError, match="another roster"):
        files.load_party(path, other_roster)
    data = bytearray(path.read_bytes())
    data[-(len(roster.members) * 2 * 8192 * 8) - 1] ^= 1  # last byte of the signing key
    bad = tmp_path / "bad.party"
    bad.write_bytes(bytes(data))
    with pytest.raises(files.FileError, match="signing key"):
        files.load_party(bad, roster)


def test_backend_codecs_on_key_files(tmp_path):
    """write_keys + make_codec: parties encode, the server validates and adds; no one decodes."""
    from fedtune.crypto import CryptoError
    from fedtune.secure import make_codec
    from fedtune.secure.multiparty.backend import write_keys

    paths = write_keys(tmp_path / "keys", ["a", "b"], run="r")
    server = make_codec("ckks-multiparty", length=100, context=paths["public"], public=True)
    a = make_codec("ckks-multiparty", length=100, context=paths["a"])
    b = make_codec("ckks-multiparty", length=100, context=paths["b"])
    total = server.add(
        [server.validate(a.encode(np.ones(100))), server.validate(b.encode(np.ones(100)))]
    )
    assert server.validate(total, aggregate=True) == total
    with pytest.raises(CryptoError, match="quorum"):
        a.decode(total)
    with pytest.raises(CryptoError, match="public.ctx"):
        make_codec("ckks-multiparty", length=100, context=paths["a"], public=True)
