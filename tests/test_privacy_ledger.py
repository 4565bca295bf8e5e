"""Ledger (append-only, idempotent, crash-tolerant), client-level DP and audit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("opacus")

from fedtune.privacy.accounting import AccountantState  # noqa: E402
from fedtune.privacy.audit import audit_records  # noqa: E402
from fedtune.privacy.client_level import (  # noqa: E402
    clip_update,
    compose_client_round,
    distributed_noise,
    effective_noise_multiplier,
)
from fedtune.privacy.ledger import (  # noqa: E402
    LedgerConflictError,
    LedgerCorruptError,
    LedgerRecord,
    PrivacyLedger,
)

DELTA = 1e-5
ROUND = dict(noise_multiplier=1.0, sample_rate=0.05, steps=40, max_grad_norm=1.0, delta=DELTA)


def _fill(
    ledger: PrivacyLedger, rounds: int, client: str = "c0", run_id: str = "run"
) -> list[LedgerRecord]:
    return [
        ledger.record(run_id=run_id, round=r, client=client, timestamp=1000.0 + r, **ROUND)
        for r in range(1, rounds + 1)
    ]


def test_ledger_epsilon_equals_one_shot_accountant(tmp_path: Path) -> None:
    from opacus.accountants import PRVAccountant

    ledger = PrivacyLedger(tmp_path / "privacy" / "c0.jsonl")
    recs = _fill(ledger, 3)
    one_shot = PRVAccountant()
    one_shot.history = [(1.0, 0.05, 120)]
    assert recs[-1].epsilon == one_shot.get_epsilon(delta=DELTA)
    assert recs[0].epsilon < recs[1].epsilon < recs[2].epsilon
    assert ledger.history() == AccountantState().compose(
        noise_multiplier=1.0, sample_rate=0.05, steps=40
    ).compose(noise_multiplier=1.0, sample_rate=0.05, steps=40).compose(
        noise_multiplier=1.0, sample_rate=0.05, steps=40
    )
    assert [json.loads(line)["round"] for line in ledger.path.read_text().splitlines()] == [1, 2, 3]


def test_resumed_round_is_not_counted_twice(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    first = _fill(ledger, 2)
    again = ledger.record(run_id="run", round=2, client="c0", timestamp=5.0, **ROUND)
    assert again == first[1]  # the stored record, timestamp included
    assert len(ledger.records()) == 2
    with pytest.raises(LedgerConflictError, match=r"round \('run', 2, 'c0'\) is already in"):
        ledger.record(run_id="run", round=2, client="c0", **{**ROUND, "steps": 41})


def test_torn_last_line_is_ignored_then_repaired(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    recs = _fill(ledger, 2)
    with open(ledger.path, "ab") as fh:  # a crash halfway through writing round 3
        fh.write(b'{"accountant": "prv", "client": "c0", "del')
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert ledger.records() == recs
    with pytest.warns(RuntimeWarning, match="torn last line"):
        third = ledger.record(run_id="run", round=3, client="c0", timestamp=3.0, **ROUND)
    assert ledger.records() == [*recs, third]  # no warning any more: repaired
    assert ledger.path.read_bytes().endswith(b"}\n")


def test_complete_last_record_missing_newline_is_kept(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    _fill(ledger, 2)
    ledger.path.write_bytes(ledger.path.read_bytes()[:-1])
    assert len(ledger.records()) == 2
    ledger.record(run_id="run", round=3, client="c0", **ROUND)
    assert len(ledger.records()) == 3


def test_corrupt_middle_line_raises(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    _fill(ledger, 2)
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("garbage\n" + "".join(lines))
    with pytest.raises(LedgerCorruptError, match="line 1 is not a valid record"):
        ledger.records()


def test_history_refuses_mixed_clients(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "all.jsonl")
    _fill(ledger, 2, client="a")
    _fill(ledger, 1, client="b")
    with pytest.raises(ValueError, match=r"several values of `client` \(\['a', 'b'\]\)"):
        ledger.history()
    assert ledger.history(client="b").total_steps == 40
    assert ledger.history("run", client="a").total_steps == 80


def test_cumulative_epsilon_spans_runs(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "node.jsonl")
    first = _fill(ledger, 1, run_id="r1")
    second = _fill(ledger, 1, run_id="r2")
    assert second[0].epsilon > first[0].epsilon  # same data, second run adds up


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("level", "user", r"`level` must be one of \('example', 'client'\), got 'user'"),
        ("max_grad_norm", 0.0, r"`max_grad_norm` must be finite and > 0, got 0.0"),
        ("round", 0, r"`round` must be an integer >= 1, got 0"),
        ("client", "", r"`client` must be a non-empty string, got ''"),
        ("delta", 0.0, r"`delta` must be a delta in \(0, 1\), got 0.0"),
        ("accountant", "gdp", r"`accountant` must be one of \('prv', 'rdp'\), got 'gdp'"),
    ],
)
def test_bad_record_inputs(tmp_path: Path, field: str, value: object, match: str) -> None:
    kw = dict(run_id="run", round=1, client="c0", **ROUND)
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
    report = audit_records(records, budget_epsilon=records[-1]["epsilon"] + 0.5)
    assert report.ok
    (c,) = report.clients
    assert (c.rounds, c.total_steps, c.noise_multipliers, c.sample_rates) == (
        3,
        120,
        (1.0,),
        (0.05,),
    )
    assert c.epsilon_prv == records[-1]["epsilon"] < c.epsilon_rdp
    json.dumps(report.to_dict())


def test_audit_catches_epsilon_edited_down(tmp_path: Path) -> None:
    records = _ledger_dicts(tmp_path)
    records[1]["epsilon"] -= 0.1  # a middle record massaged down
    report = audit_records(records, budget_epsilon=None)
    (c,) = report.clients
    assert c.verdict == "under-reported" and not report.ok
    assert "round 2" in c.problems[0]
    # within the stated tolerance it is numerics, not under-reporting
    records = _ledger_dicts(tmp_path / "b")
    records[-1]["epsilon"] -= 0.01
    assert audit_records(records, budget_epsilon=None).ok


def test_audit_catches_overrun(tmp_path: Path) -> None:
    records = _ledger_dicts(tmp_path)
    spent = records[-1]["epsilon"]
    report = audit_records(records, budget_epsilon=spent - 0.05)
    assert report.clients[0].verdict == "overrun"
    assert "budget" in report.clients[0].problems[0]
    # an overrun that was also hidden in the report is still an overrun
    records[-1]["epsilon"] = 0.1
    assert audit_records(records, budget_epsilon=spent - 0.05).clients[0].verdict == "overrun"


def test_audit_bad_inputs(tmp_path: Path) -> None:
    records = _ledger_dicts(tmp_path, rounds=1)
    with pytest.raises(ValueError, match=r"`budget_epsilon` must be a finite epsilon > 0, got 0"):
        audit_records(records, budget_epsilon=0)
    with pytest.raises(ValueError, match=r"`tolerance` must be finite and >= 0, got -1"):
        audit_records(records, budget_epsilon=None, tolerance=-1)
    bad = dict(records[0], sample_rate=0.0)
    with pytest.raises(ValueError, match=r"`sample_rate` must be a sampling probability"):
        audit_records([bad], budget_epsilon=None)


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


def test_distributed_noise_sums_to_central_std() -> None:
    sigma, clip, m = 1.2, 0.5, 8
    rng = np.random.default_rng(0)
    shares = [
        distributed_noise(
            200_000, noise_multiplier=sigma, clip_norm=clip, num_sampled_clients=m, generator=rng
        )
        for _ in range(m)
    ]
    # each share has std σC/√m; the sum over m clients has std σC = 0.6
    assert np.std(shares[0]) == pytest.approx(sigma * clip / math.sqrt(m), rel=0.01)
    assert np.std(np.sum(shares, axis=0)) == pytest.approx(sigma * clip, rel=0.01)
    with pytest.raises(ValueError, match=r"`num_sampled_clients` must be an integer >= 1, got 0"):
        distributed_noise(
            3, noise_multiplier=1.0, clip_norm=1.0, num_sampled_clients=0, generator=rng
        )
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be finite and > 0, got -1"):
        distributed_noise(
            3, noise_multiplier=-1, clip_norm=1.0, num_sampled_clients=2, generator=rng
        )
    with pytest.raises(ValueError, match="`generator` must be a numpy.random.Generator"):
        distributed_noise(3, noise_multiplier=1, clip_norm=1.0, num_sampled_clients=2, generator=0)  # type: ignore[arg-type]


def test_client_level_accounting() -> None:
    state = compose_client_round(
        AccountantState(), noise_multiplier=1.0, num_sampled_clients=10, num_clients=100
    )
    assert state.opacus_history() == [(1.0, 0.1, 1)]
    assert (
        effective_noise_multiplier(
            noise_multiplier=2.0, num_sampled_clients=8, num_aggregated_clients=2
        )
        == 1.0
    )
    with pytest.raises(
        ValueError, match=r"`num_sampled_clients` \(5\) cannot exceed `num_clients` \(4\)"
    ):
        compose_client_round(state, noise_multiplier=1.0, num_sampled_clients=5, num_clients=4)
    with pytest.raises(ValueError, match=r"`num_aggregated_clients` \(3\) cannot exceed"):
        effective_noise_multiplier(
            noise_multiplier=1.0, num_sampled_clients=2, num_aggregated_clients=3
        )
