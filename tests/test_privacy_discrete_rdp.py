"""The proven accountant of the Poisson-subsampled discrete Gaussian (``discrete-rdp``)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from fedtune.privacy.accountant import AccountantState, compute_epsilon, proven_accountant
from fedtune.privacy.analysis.discrete_rdp import (
    add_remove_rdp,
    discrete_rdp_epsilon,
    rdp_to_epsilon,
    replace_one_rdp_general,
)
from fedtune.privacy.analysis.rdp import REPLACE_ONE_RDP_ORDERS

DELTA = 1e-5


def _zhu_wang_mp(alpha: int, q: float, sigma: float, factor: int) -> float:
    """Zhu & Wang 2019, Theorem 6, in 60-digit arithmetic, straight from the formula
    (no logs, no cancellation tricks): the independent reference for the numpy code."""
    mpmath.mp.dps = 60
    q_, c = mpmath.mpf(q), 1 / (2 * mpmath.mpf(sigma) ** 2)
    total = (1 - q_) ** (alpha - 1) * (alpha * q_ - q_ + 1)
    total += mpmath.binomial(alpha, 2) * q_**2 * (1 - q_) ** (alpha - 2) * mpmath.e ** (2 * c)
    for ell in range(3, alpha + 1):
        term = mpmath.binomial(alpha, ell) * (1 - q_) ** (alpha - ell) * q_**ell
        total += factor * term * mpmath.e ** ((ell - 1) * ell * c)
    return float(mpmath.log(total) / (alpha - 1))


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 0.8), (0.04, 1.1), (0.16, 1.5), (0.5, 4.0)])
def test_continuous_gaussian_exact_rdp_is_below_the_general_bound(q: float, sigma: float) -> None:
    """(a) For the continuous Gaussian the exact sampled-Gaussian RDP (Mironov, Talwar &
    Zhang 2019, Opacus) is at most the general bound at every integer order: it is an
    upper bound, and in the easy direction (factor 1) it matches the exact one."""
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = [float(a) for a in range(2, 129)]
    exact = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    general = add_remove_rdp(q, sigma, 1, orders)
    assert np.all(general >= exact * (1 - 1e-9) - 1e-12)
    # and the replace-one bound at k/2 is above the continuous replace-one RDP bound
    from fedtune.privacy.analysis.rdp import replace_one_rdp

    ro_orders = [a for a in REPLACE_ONE_RDP_ORDERS if a <= 64]
    ro = replace_one_rdp_general(q, sigma, 1, ro_orders)
    assert np.all(
        ro
        >= np.minimum(
            replace_one_rdp(q, sigma, 1, ro_orders), 4 * np.array(ro_orders) / (2 * sigma**2)
        )
        - 1e-12
    )


@pytest.mark.parametrize(("alpha", "q", "sigma"), [(2, 0.05, 1.0), (7, 0.02, 0.9), (40, 0.16, 1.5)])
def test_general_bound_matches_the_theorem_in_high_precision(
    alpha: int, q: float, sigma: float
) -> None:
    got = add_remove_rdp(q, sigma, 1, [float(alpha)])[0]
    want = min(alpha / (2 * sigma**2), _zhu_wang_mp(alpha, q, sigma, 3))
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 3.0])
def test_q_one_is_the_unsubsampled_discrete_gaussian(sigma: float) -> None:
    """(b) q = 1: CKS Theorem 14, α Δ² / (2 s²) with s = σ Δ; Δ = R (add/remove), 2R
    (replace-one)."""
    orders = [2.0, 3.0, 10.0, 64.0]
    assert add_remove_rdp(1.0, sigma, 5, orders) == pytest.approx(
        [5 * a / (2 * sigma**2) for a in orders], rel=1e-15
    )
    assert replace_one_rdp_general(1.0, sigma, 1, [1.5, *orders]) == pytest.approx(
        [4 * a / (2 * sigma**2) for a in [1.5, *orders]], rel=1e-15
    )


def test_regression_value() -> None:
    """(c) Golden ε values; recompute with ``python -c "from fedtune.privacy.analysis.
    discrete_rdp import discrete_rdp_epsilon as f; print(f([(1.0, 0.01, 1000)],
    delta=1e-5, relation='replace-one'))"`` at the commit that added this test, and
    checked against the mpmath reference at the optimal order below."""
    ro = discrete_rdp_epsilon([(1.0, 0.01, 1000)], delta=DELTA, relation="replace-one")
    ar = discrete_rdp_epsilon([(1.0, 0.01, 1000)], delta=DELTA, relation="add-remove")
    mixed = discrete_rdp_epsilon(
        [(2.0, 0.05, 300), (10.0, 1.0, 6)], delta=DELTA, relation="replace-one"
    )
    assert ro == pytest.approx(5.14038221930146, rel=1e-9)
    assert ar == pytest.approx(2.450287904421316, rel=1e-9)
    assert mixed == pytest.approx(6.291713249964519, rel=1e-9)
    # add/remove from the independent high-precision formula, minimised over the orders
    best = min(
        1000 * min(a / 2, _zhu_wang_mp(a, 0.01, 1.0, 3))
        + math.log1p(-1 / a)
        - (math.log(DELTA) + math.log(a)) / (a - 1)
        for a in range(2, 40)
    )
    assert ar == pytest.approx(best, rel=1e-9)


def test_conversion_is_opacus_improved_conversion() -> None:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = [1.5, 2.0, 3.0, 8.0, 32.0]
    rdp = np.array([0.3, 0.5, 0.9, 2.0, 7.0])
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert rdp_to_epsilon(orders, rdp, delta=DELTA) == pytest.approx(float(eps), rel=1e-12)


def test_discrete_bound_is_above_prv_for_the_same_history() -> None:
    history = [(0.9, 0.04, 125), (10.0, 1.0, 6)]
    prv = compute_epsilon(history, delta=DELTA, accountant="prv", relation="replace-one")
    disc = compute_epsilon(history, delta=DELTA, accountant="discrete-rdp", relation="replace-one")
    assert disc > prv


def test_stable_at_large_orders_and_tiny_rates() -> None:
    curve = replace_one_rdp_general(1e-4, 50.0, 10**6, REPLACE_ONE_RDP_ORDERS)
    assert np.all(np.isfinite(curve)) and np.all(curve >= 0)
    assert np.all(np.diff(curve) >= -1e-12)  # RDP is non-decreasing in the order
    eps = discrete_rdp_epsilon([(0.3, 0.5, 10**4)], delta=DELTA, relation="replace-one")
    assert math.isfinite(eps) and eps > 100


def test_a_history_with_a_discrete_release_is_evaluated_with_the_proven_accountant() -> None:
    assert proven_accountant("prv", ["gaussian"]) == "prv"
    assert proven_accountant("prv", ["gaussian", "discrete-gaussian"]) == "discrete-rdp"
    state = AccountantState().compose(
        noise_multiplier=1.0, sample_rate=0.04, steps=100, mechanism="discrete-gaussian"
    )
    proven = compute_epsilon(
        state.opacus_history(), delta=DELTA, accountant="discrete-rdp", relation="replace-one"
    )
    assert state.epsilon(delta=DELTA, accountant="prv", relation="replace-one") == proven
    with pytest.raises(ValueError, match="mechanism"):
        state.compose(noise_multiplier=1.0, sample_rate=0.1, steps=1, mechanism="laplace")


# -- the ledger records the mechanism; the audit recomputes with the proven accountant ----

GRID_ROUND = dict(
    noise_multiplier=1.0,
    sample_rate=0.05,
    steps=40,
    max_grad_norm=1.0,
    delta=DELTA,
    accountant="prv",  # the run's choice: not proven for the grid, so replaced
    relation="replace-one",
    level="example",
    noise="csprng",
    batch_size=20,
    local_epochs=2,
    num_examples=400,
)


def _grid_ledger(tmp_path, rounds: int = 2):  # type: ignore[no-untyped-def]
    from fedtune.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "c0.jsonl")
    for r in range(1, rounds + 1):
        ledger.record(
            run_id="run",
            run_nonce="n1",
            input_hash=f"h{r}",
            round=r,
            client="c0",
            timestamp=1000.0 + r,
            mechanism="discrete-gaussian",
            **GRID_ROUND,  # type: ignore[arg-type]
        )
    return ledger


def test_ledger_records_the_mechanism_and_the_accountant_that_proves_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from fedtune.privacy.record import LedgerRecord

    ledger = _grid_ledger(tmp_path)
    lines = [json.loads(x) for x in ledger.path.read_text().splitlines()]
    assert [(x["mechanism"], x["accountant"]) for x in lines] == [
        ("discrete-gaussian", "discrete-rdp")
    ] * 2
    proven = discrete_rdp_epsilon([(1.0, 0.05, 80)], delta=DELTA, relation="replace-one")
    prv = compute_epsilon([(1.0, 0.05, 80)], delta=DELTA, accountant="prv", relation="replace-one")
    assert lines[-1]["epsilon"] == pytest.approx(proven, rel=1e-12)
    assert lines[-1]["epsilon"] > prv + 1
    # a float evaluation after grid rounds is composed with the proven accountant too
    evaluation = LedgerRecord(
        **{**lines[-1], "kind": "eval", "run_nonce": "n1", "round": 2, "sample_rate": 1.0}
        | {"steps": 1, "noise_multiplier": 10.0, "mechanism": "gaussian", "accountant": "prv"}
    )
    stored = ledger.append(evaluation)
    assert stored.accountant == "discrete-rdp" and stored.epsilon > lines[-1]["epsilon"]
    # a record cannot claim an accountant not proven for its own mechanism
    with pytest.raises(ValueError, match="not proven for mechanism 'discrete-gaussian'"):
        LedgerRecord(**{**lines[0], "accountant": "prv"})
    # a record written before the mechanism existed reads as float Gaussian noise
    legacy = {k: v for k, v in lines[0].items() if k != "mechanism"}
    assert LedgerRecord.from_dict({**legacy, "accountant": "prv"}).mechanism == "gaussian"


def test_audit_recomputes_grid_rounds_with_the_proven_accountant(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from fedtune.privacy.audit import RunExpectation, audit_records

    ledger = _grid_ledger(tmp_path)
    lines = [json.loads(x) for x in ledger.path.read_text().splitlines()]
    expect = RunExpectation(mechanism="discrete-gaussian")
    (ok,) = audit_records(lines, budget_epsilon=None, delta=DELTA, expect=expect).clients
    assert ok.verdict == "ok", ok.problems
    assert (ok.accountant, ok.mechanisms) == ("discrete-rdp", ("discrete-gaussian",))
    assert ok.epsilon_proven == pytest.approx(lines[-1]["epsilon"], rel=1e-12)
    assert ok.epsilon_prv < ok.epsilon_proven  # the continuous figure, for comparison
    # relabelled as float noise with the (smaller) PRV ε: fails
    forged = []
    for x in lines:
        history = [(1.0, 0.05, 40 * x["round"])]
        eps = compute_epsilon(history, delta=DELTA, accountant="prv", relation="replace-one")
        forged.append({**x, "mechanism": "gaussian", "accountant": "prv", "epsilon": eps})
    (bad,) = audit_records(forged, budget_epsilon=None, delta=DELTA, expect=expect).clients
    assert bad.verdict == "under-reported"
    assert any("records mechanism 'gaussian'" in p for p in bad.problems)
    assert any("discrete-rdp recomputes" in p for p in bad.problems)
    # ε below the proven bound, mechanism left as it is: fails too
    low = [{**x, "epsilon": x["epsilon"] * 0.9} for x in lines]
    (under,) = audit_records(low, budget_epsilon=None, delta=DELTA, expect=expect).clients
    assert under.verdict == "under-reported"
    # a budget the proven ε exceeds is an overrun even where PRV would fit
    (over,) = audit_records(
        lines, budget_epsilon=ok.epsilon_prv + 0.5, delta=DELTA, expect=expect
    ).clients
    assert over.verdict == "overrun"
