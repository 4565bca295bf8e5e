"""Ledger (append-only, idempotent, crash-tolerant), client-level DP and audit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("opacus")

from fedtune.errors import LedgerConflictError, LedgerCorruptError
from fedtune.privacy.accountant import AccountantState, compute_epsilon  # noqa: E402
from fedtune.privacy.audit import RunExpectation, audit_records  # noqa: E402
from fedtune.privacy.client_level import (  # noqa: E402
    clip_update,
    compose_client_round,
    distributed_noise,
)
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.noise import SeededNoise  # noqa: E402
from fedtune.privacy.record import LedgerRecord  # noqa: E402

DELTA = 1e-5
# q = batch_size / num_examples = 20 / 400, steps = local_epochs * int(1 / q) = 2 * 20
ROUND = dict(
    noise_multiplier=1.0,
    sample_rate=0.05,
    steps=40,
    max_grad_norm=1.0,
    delta=DELTA,
    accountant="prv",
    relation="replace-one",
    level="example",
    noise="csprng",
    batch_size=20,
    local_epochs=2,
    num_examples=400,
)


def _fill(
    ledger: PrivacyLedger, rounds: int, client: str = "c0", run_id: str = "run", nonce: str = "n1"
) -> list[LedgerRecord]:
    return [
        ledger.record(
            run_id=run_id,
            run_nonce=nonce,
            input_hash=f"h{r}",
            round=r,
            client=client,
            timestamp=1000.0 + r,
            **ROUND,
        )
        for r in range(1, rounds + 1)
    ]


def test_ledger_epsilon_equals_one_shot_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy" / "c0.jsonl")
    recs = _fill(ledger, 3)
    one_shot = compute_epsilon(
        [(1.0, 0.05, 120)], delta=DELTA, accountant="prv", relation="replace-one"
    )
    assert recs[-1].epsilon == one_shot
    assert recs[0].epsilon < recs[1].epsilon < recs[2].epsilon
    assert ledger.history(client="c0", level="example") == AccountantState().compose(
        noise_multiplier=1.0, sample_rate=0.05, steps=40
    ).compose(noise_multiplier=1.0, sample_rate=0.05, steps=40).compose(
        noise_multiplier=1.0, sample_rate=0.05, steps=40
    )
    assert [json.loads(line)["round"] for line in ledger.path.read_text().splitlines()] == [1, 2, 3]


def _again(ledger: PrivacyLedger, **change: object) -> LedgerRecord:
    kw = dict(run_id="run", run_nonce="n1", input_hash="h2", round=2, client="c0", **ROUND)
    return ledger.record(**{**kw, **change})  # type: ignore[arg-type]


def test_replayed_release_is_not_counted_twice(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    first = _fill(ledger, 2)
    again = _again(ledger, timestamp=5.0)
    assert again == first[1]  # the stored record, timestamp included
    assert len(ledger.records()) == 2
    with pytest.raises(LedgerConflictError, match=r"release \('n1', 2, 'c0'\) is already in"):
        _again(ledger, steps=41)


def test_second_release_of_a_round_from_another_input_is_refused(tmp_path: Path) -> None:
    # Before releases were nonce-keyed, this was "already recorded": skipped, not counted.
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    _fill(ledger, 2)
    with pytest.raises(LedgerConflictError, match="another input or parameters"):
        _again(ledger, input_hash="another-global-state")
    assert len(ledger.records()) == 2


def test_a_new_run_under_the_same_run_id_is_a_new_counted_release(tmp_path: Path) -> None:
    # Same run-id (e.g. a second run-dir with the same basename), same round: the client's
    # own nonce differs, so the release is appended and composes with the first run.
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    first = _fill(ledger, 1)
    second = _fill(ledger, 1, nonce="n2")
    assert len(ledger.records()) == 2
    assert second[0].epsilon > first[0].epsilon


def test_torn_last_line_is_ignored_then_repaired(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    recs = _fill(ledger, 2)
    with open(ledger.path, "ab") as fh:  # a crash halfway through writing round 3
        fh.write(b'{"accountant": "prv", "client": "c0", "del')
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert ledger.records() == recs
    with pytest.warns(RuntimeWarning, match="torn last line"):
        third = _again(ledger, round=3, input_hash="h3", timestamp=3.0)
    assert ledger.records() == [*recs, third]  # no warning any more: repaired
    assert ledger.path.read_bytes().endswith(b"}\n")


def test_complete_last_record_missing_newline_is_kept(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    _fill(ledger, 2)
    ledger.path.write_bytes(ledger.path.read_bytes()[:-1])
    assert len(ledger.records()) == 2
    _again(ledger, round=3, input_hash="h3")
    assert len(ledger.records()) == 3


def test_corrupt_middle_line_raises(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    _fill(ledger, 2)
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("garbage\n" + "".join(lines))
    with pytest.raises(LedgerCorruptError, match="line 1 is not a valid record"):
        ledger.records()


def test_history_is_per_client_and_example_level_counts_client_level_rounds(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path / "all.jsonl")
    _fill(ledger, 2, client="a")
    _fill(ledger, 1, client="b")
    assert ledger.history(client="b", level="example").total_steps == 40
    assert ledger.history(client="a", level="example").total_steps == 80
    client_round = {
        **ROUND,
        "level": "client",
        "sample_rate": 1.0,
        "steps": 1,
        "batch_size": 0,
        "local_epochs": 0,
        "sampled_clients": 4,
        "tolerance": 1,
    }
    rec = ledger.record(
        run_id="r2", run_nonce="n9", input_hash="x", round=1, client="a", **client_round
    )
    # the client-level ε composes client-level releases only ...
    assert rec.epsilon == compute_epsilon(
        [(1.0, 1.0, 1)], delta=DELTA, accountant="prv", relation="replace-one"
    )
    assert ledger.history(client="a", level="client").total_steps == 1
    # ... the example-level guarantee is spent by every release of the data
    assert ledger.history(client="a", level="example").total_steps == 81


def test_legacy_records_load_as_replace_one_seeded_and_keyed_by_run_id(tmp_path: Path) -> None:
    legacy = {
        "run_id": "run", "round": 1, "client": "c0", "noise_multiplier": 1.0,
        "sample_rate": 0.05, "steps": 40, "max_grad_norm": 1.0, "delta": DELTA,
        "accountant": "prv", "epsilon": 1.0, "level": "example", "timestamp": 1.0,
    }  # fmt: skip
    rec = LedgerRecord.from_dict(legacy)
    assert rec.legacy and rec.key == ("legacy:run", 1, "c0")
    assert (rec.relation, rec.noise) == ("replace-one", "seeded")


def test_cumulative_epsilon_spans_runs(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "node.jsonl")
    first = _fill(ledger, 1, run_id="r1")
    second = _fill(ledger, 1, run_id="r2", nonce="n2")
    assert second[0].epsilon > first[0].epsilon  # same data, second run adds up


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("level", "user", r"`level` must be one of \('example', 'client'\), got 'user'"),
        ("max_grad_norm", 0.0, r"`max_grad_norm` must be finite and > 0, got 0.0"),
        ("round", 0, r"`round` must be an integer >= 1, got 0"),
        ("client", "", r"`client` must be a non-empty string, got ''"),
        ("delta", 0.0, r"`delta` must be a delta in \(0, 1\), got 0.0"),
        (
            "accountant",
            "gdp",
            r"`accountant` must be one of \('prv', 'rdp', 'discrete-rdp'\), got 'gdp'",
        ),
        ("relation", "zero-out", r"`relation` must be one of .*got 'zero-out'"),
        ("noise", "mt19937", r"`noise` must be one of \('csprng', 'seeded'\), got 'mt19937'"),
        ("run_nonce", "", r"`run_nonce` must be the client's own nonce"),
        ("input_hash", "x" * 200, r"`input_hash` must be a short printable string"),
        ("batch_size", -1, r"`batch_size` must be an integer >= 0, got -1"),
    ],
)
def test_bad_record_inputs(tmp_path: Path, field: str, value: object, match: str) -> None:
    kw = dict(run_id="run", run_nonce="n1", input_hash="h", round=1, client="c0", **ROUND)
    kw[field] = value
    with pytest.raises(ValueError, match=match):
        PrivacyLedger(tmp_path / "x.jsonl").record(**kw)  # type: ignore[arg-type]
    assert not (tmp_path / "x.jsonl").exists() or not (tmp_path / "x.jsonl").read_text()


# -- audit -------------------------------------------------------------------------------


def _ledger_dicts(tmp_path: Path, rounds: int = 3) -> list[dict]:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    _fill(ledger, rounds)
    return [json.loads(line) for line in ledger.path.read_text().splitlines()]


def test_audit_ok(tmp_path: Path) -> None:
    records = _ledger_dicts(tmp_path)
    report = audit_records(records, budget_epsilon=records[-1]["epsilon"] + 0.5, delta=DELTA)
    assert report.ok
    (c,) = report.clients
    assert (c.rounds, c.total_steps, c.noise_multipliers, c.sample_rates) == (
        3,
        120,
        (1.0,),
        (0.05,),
    )
    assert (c.relation, c.noise) == ("replace-one", "csprng")
    assert c.epsilon_prv == records[-1]["epsilon"] < c.epsilon_rdp
    json.dumps(report.to_dict())


def test_audit_catches_epsilon_edited_down(tmp_path: Path) -> None:
    records = _ledger_dicts(tmp_path)
    records[1]["epsilon"] -= 0.1  # a middle record massaged down
    report = audit_records(records, budget_epsilon=None, delta=DELTA)
    (c,) = report.clients
    assert c.verdict == "under-reported" and not report.ok
    assert "round 2" in c.problems[0]
    # within the stated tolerance it is numerics, not under-reporting
    records = _ledger_dicts(tmp_path / "b")
    records[-1]["epsilon"] -= 0.01
    assert audit_records(records, budget_epsilon=None, delta=DELTA).ok


def test_audit_catches_overrun(tmp_path: Path) -> None:
    records = _ledger_dicts(tmp_path)
    spent = records[-1]["epsilon"]
    report = audit_records(records, budget_epsilon=spent - 0.05, delta=DELTA)
    assert report.clients[0].verdict == "overrun"
    assert "budget" in report.clients[0].problems[0]
    # an overrun that was also hidden in the report is still an overrun
    records[-1]["epsilon"] = 0.1
    verdict = audit_records(records, budget_epsilon=spent - 0.05, delta=DELTA).clients[0].verdict
    assert verdict == "overrun"


def test_audit_recomputes_at_the_configured_delta_not_the_records_delta(tmp_path: Path) -> None:
    # A ledger written at δ = 0.05 states a small ε that is honest *at 0.05*; at the
    # configured δ = 1e-5 the same mechanism is far over the budget. Today's code (before
    # this fix) audited each record at its own δ and passed it.
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    for r in range(1, 4):
        ledger.record(
            run_id="run",
            run_nonce="n1",
            input_hash=f"h{r}",
            round=r,
            client="c0",
            **{**ROUND, "delta": 0.05, "noise_multiplier": 0.7},
        )
    records = ledger.records()
    assert records[-1].epsilon < 8.0  # honest at δ = 0.05
    report = audit_records(records, budget_epsilon=8.0, delta=DELTA)
    (c,) = report.clients
    assert c.verdict == "overrun" and c.epsilon_prv > 8.0 and c.delta == DELTA
    assert any("recorded at δ=0.05, not the audit δ=1e-05" in p for p in c.problems)
    # within the budget but at the wrong δ: still not ok
    loose = audit_records(records, budget_epsilon=1e6, delta=DELTA).clients[0]
    assert loose.verdict == "inconsistent"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"num_examples": 500}, "is not batch_size / num_examples"),
        ({"steps": 39}, "is not local_epochs · int(1/q)"),
    ],
)
def test_audit_cross_checks_the_composition(tmp_path: Path, change: dict, problem: str) -> None:
    records = [dict(r, **change) for r in _ledger_dicts(tmp_path, rounds=1)]
    (c,) = audit_records(records, budget_epsilon=None, delta=DELTA, tolerance=100).clients
    assert c.verdict == "inconsistent" and any(problem in p for p in c.problems), c.problems


def test_audit_checks_records_against_the_run_config(tmp_path: Path) -> None:
    records = _ledger_dicts(tmp_path, rounds=1)
    expect = RunExpectation(batch_size=64, local_epochs=2, max_grad_norm=1.0)
    (c,) = audit_records(records, budget_epsilon=None, delta=DELTA, expect=expect).clients
    assert c.verdict == "inconsistent"
    assert any("batch_size=20, the run config says 64" in p for p in c.problems)


def test_audit_marks_seeded_noise_as_not_for_real_data(tmp_path: Path) -> None:
    records = [dict(r, noise="seeded") for r in _ledger_dicts(tmp_path, rounds=1)]
    (c,) = audit_records(records, budget_epsilon=None, delta=DELTA).clients
    assert c.verdict == "ok" and c.noise == "seeded"
    assert any("not for real data" in p for p in c.problems)


def test_audit_bad_inputs(tmp_path: Path) -> None:
    records = _ledger_dicts(tmp_path, rounds=1)
    with pytest.raises(ValueError, match=r"`budget_epsilon` must be a finite epsilon > 0, got 0"):
        audit_records(records, budget_epsilon=0, delta=DELTA)
    with pytest.raises(ValueError, match=r"`tolerance` must be finite and >= 0, got -1"):
        audit_records(records, budget_epsilon=None, delta=DELTA, tolerance=-1)
    with pytest.raises(ValueError, match=r"`delta` must be a delta in \(0, 1\), got 2"):
        audit_records(records, budget_epsilon=None, delta=2)
    bad = dict(records[0], sample_rate=0.0)
    with pytest.raises(ValueError, match=r"`sample_rate` must be a sampling probability"):
        audit_records([bad], budget_epsilon=None, delta=DELTA)


# -- client-level DP ---------------------------------------------------------------------


def test_clip_update_by_hand() -> None:
    clipped, norm = clip_update(np.array([3.0, 4.0]), clip_norm=1.0)
    assert norm == 5.0 and np.allclose(clipped, [0.6, 0.8])
    small = np.array([0.3, 0.4])
    out = clip_update(small, clip_norm=1.0)
    assert out.norm == pytest.approx(0.5) and np.array_equal(out.clipped, small)
    with pytest.raises(ValueError, match=r"`clip_norm` must be finite and > 0, got 0"):
        clip_update(small, clip_norm=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        clip_update(np.array([np.nan]), clip_norm=1.0)


def test_distributed_noise_keeps_sigma_with_t_shares_missing() -> None:
    sigma, clip, m, t = 1.2, 0.5, 8, 2
    noise = SeededNoise(0)
    kw = dict(noise_multiplier=sigma, clip_norm=clip, num_sampled_clients=m, tolerance=t)
    shares = [distributed_noise(200_000, noise=noise, **kw) for _ in range(m)]
    # each share has std σC/√(m-t); any m - t of them sum to std σC = 0.6
    assert np.std(shares[0]) == pytest.approx(sigma * clip / math.sqrt(m - t), rel=0.01)
    assert np.std(np.sum(shares[: m - t], axis=0)) == pytest.approx(sigma * clip, rel=0.01)
    with pytest.raises(ValueError, match=r"`num_sampled_clients` must be an integer >= 1, got 0"):
        distributed_noise(3, noise=noise, **{**kw, "num_sampled_clients": 0})
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be finite and > 0, got -1"):
        distributed_noise(3, noise=noise, **{**kw, "noise_multiplier": -1})
    with pytest.raises(ValueError, match=r"`tolerance` must be an integer in \[0, 7\]"):
        distributed_noise(3, noise=noise, **{**kw, "tolerance": 8})


def test_client_level_accounting_is_one_unamplified_step_per_round() -> None:
    # The server picks the clients from a seed it knows: no amplification (q = 1), and
    # not q = m / N as before this fix.
    state = compose_client_round(AccountantState(), noise_multiplier=1.0)
    assert state.opacus_history() == [(1.0, 1.0, 1)]


def test_audit_agrees_with_google_dp_accounting_on_a_realistic_ledger(tmp_path: Path) -> None:
    # private.toml's client: n_k = 400, batch 64 (q = 0.16), 2 epochs of 6 steps, 5 rounds,
    # σ = 1.48 (what a target of ε = 8 calibrates under replace-one); then a second run of
    # the same data with another σ: the audit composes both, as the budget does.
    dpa = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    ledger = PrivacyLedger(tmp_path / "node.jsonl")
    base = {**ROUND, "sample_rate": 0.16, "steps": 12, "batch_size": 64, "num_examples": 400}
    for nonce, sigma, rounds in (("run-1", 1.48, 5), ("run-2", 2.0, 3)):
        for r in range(1, rounds + 1):
            ledger.record(
                run_id=nonce,
                run_nonce=nonce,
                input_hash=f"{nonce}-{r}",
                round=r,
                client="c0",
                **{**base, "noise_multiplier": sigma},
            )
    (c,) = audit_records(ledger.records(), budget_epsilon=None, delta=DELTA).clients
    assert c.verdict == "ok", c.problems
    pld = PLDAccountant(
        neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=1e-3,
    )
    for sigma, steps in ((1.48, 60), (2.0, 36)):
        pld.compose(dpa.PoissonSampledDpEvent(0.16, dpa.GaussianDpEvent(sigma)), steps)
    independent = pld.get_epsilon(DELTA)
    assert independent - 0.005 <= c.epsilon_prv <= independent + 0.03, (c.epsilon_prv, independent)
    assert c.epsilon_rdp >= c.epsilon_prv
