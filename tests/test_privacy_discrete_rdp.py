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


def _autodp_general_upperbound_mp(alpha: int, q: float, sigma: float) -> float:
    """Independent port of autodp's implementation of the same theorem,
    ``autodp.rdp_acct.general_upperbound`` (github.com/yuxiangw/autodp, commit 06489ea; the
    code behind the paper's "general upper bound" curves, ``papers/ICML18-PoissonSampling``),
    for ``ε(α) = α / (2σ²)``. autodp writes the bracket as ``pos − neg`` with
    ``pos = (1−q)^α + 3 e^{−ε(α)} (1 − q + q e^{ε(α)})^α`` (the binomial sum with every
    ``ℓ``-th moment at ``e^{(ℓ−1)ε(α)}``) and ``neg`` taking back the excess of each term
    (``ℓ = 0, 1, 2`` and ``3 ≤ ℓ ≤ 50``). Same algebra, evaluated in 60 digits, because
    autodp's float64 subtraction loses up to ~1e-3 relative (σ = 2, q = 0.001)."""
    mpmath.mp.dps = 60
    q_, a = mpmath.mpf(q), alpha

    def eps(x: int) -> mpmath.mpf:
        return mpmath.mpf(x) / (2 * mpmath.mpf(sigma) ** 2)

    pos = (1 - q_) ** a + 3 * mpmath.e ** (-eps(a)) * (1 - q_ + q_ * mpmath.e ** eps(a)) ** a
    neg = mpmath.mpf(0)
    for ell in range(3, min(50, a - 1) + 1):
        neg += (
            3
            * mpmath.binomial(a, ell)
            * (1 - q_) ** (a - ell)
            * q_**ell
            * (mpmath.e ** ((ell - 1) * eps(a)) - mpmath.e ** ((ell - 1) * eps(ell)))
        )
    neg += (
        mpmath.binomial(a, 2)
        * q_**2
        * (1 - q_) ** (a - 2)
        * (3 * mpmath.e ** eps(a) - mpmath.e ** eps(2))
    )
    neg += 2 * q_ * a * (1 - q_) ** (a - 1) + 3 * (1 - q_) ** a * mpmath.e ** (-eps(a))
    return float(mpmath.log(pos - neg) / (a - 1))


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("q", [0.001, 0.01, 0.1, 0.5])
def test_add_remove_bound_is_autodp_general_upper_bound(sigma: float, q: float) -> None:
    """The add/remove curve is Zhu & Wang's Theorem 6 as the paper's authors implement it
    (autodp), capped by the base curve; pinned at every integer order 2..51 (autodp's
    50-term form is exact there)."""
    orders = [float(a) for a in range(2, 52)]
    got = add_remove_rdp(q, sigma, 1, orders)
    want = [
        min(a / (2 * sigma**2), _autodp_general_upperbound_mp(int(a), q, sigma)) for a in orders
    ]
    assert got == pytest.approx(want, rel=1e-11)


def _dg_exact(sigma: float, q: float, alphas: list[float]) -> dict[str, list[float]]:
    """Exact Rényi divergences of the 1-D Poisson-subsampled discrete Gaussian N_Z(0, σ²),
    sensitivity 1, summed over the integers (mpmath, 40 digits): add, remove and
    replace-one (shift +1 against −1)."""
    mpmath.mp.dps = 40
    s2 = mpmath.mpf(sigma) ** 2
    ks = range(-int(60 * sigma) - 80, int(60 * sigma) + 81)
    w = [mpmath.e ** (-(mpmath.mpf(k) ** 2) / (2 * s2)) for k in ks]
    z = mpmath.fsum(w)

    def law(shift: int) -> list[mpmath.mpf]:
        return [mpmath.e ** (-(mpmath.mpf(k - shift) ** 2) / (2 * s2)) / z for k in ks]

    a0, b, b2 = law(0), law(1), law(-1)
    p = [(1 - q) * x + q * y for x, y in zip(a0, b, strict=True)]
    p2 = [(1 - q) * x + q * y for x, y in zip(a0, b2, strict=True)]

    def d(x: list[mpmath.mpf], y: list[mpmath.mpf], al: float) -> float:
        al_ = mpmath.mpf(al)
        return float(
            mpmath.log(mpmath.fsum(u**al_ * v ** (1 - al_) for u, v in zip(x, y, strict=True)))
            / (al_ - 1)
        )

    return {
        "remove": [d(p, a0, al) for al in alphas],
        "add": [d(a0, p, al) for al in alphas],
        "replace": [d(p, p2, al) for al in alphas],
    }


@pytest.mark.parametrize(("sigma", "q"), [(0.7, 0.1), (1.0, 0.01), (2.0, 0.5)])
def test_bounds_are_above_the_exact_discrete_gaussian_divergences(sigma: float, q: float) -> None:
    """Necessary (not sufficient) check against the mechanism itself: the 1-D discrete
    Gaussian's exact subsampled divergences, each direction, are below the bounds: the
    factor-3 curve for "add" D_α(A‖(1−q)A+qB), the factor-1 binomial expansion for
    "remove" D_α((1−q)A+qB‖A), and the replace-one curve for D_α(P‖Q)."""
    from fedtune.privacy.analysis.discrete_rdp import _add_remove_curve

    alphas = [2.0, 3.0, 5.0, 8.0, 16.0]
    exact = _dg_exact(sigma, q, alphas)
    both = _add_remove_curve(q, sigma)
    remove = _add_remove_curve(q, sigma, 1.0)
    for i, al in enumerate(alphas):
        assert exact["add"][i] <= both[int(al)] * (1 + 1e-12)
        assert exact["remove"][i] <= remove[int(al)] * (1 + 1e-12)
    ro_orders = [1.5, 2.0, 4.5, 8.0]
    ro_exact = _dg_exact(sigma, q, ro_orders)["replace"]
    ro = replace_one_rdp_general(q, sigma, 1, ro_orders)
    assert np.all(np.asarray(ro_exact) <= ro * (1 + 1e-12))


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


def test_general_bound_holds_for_random_finite_mechanisms() -> None:
    """Theorem 6 is for *any* mechanism, and the code leans on that for the add direction
    ``D_α(A‖(1−q)A+qB)``. Random finite pairs (A, B), with ``c`` the smallest slope such
    that ``D_ℓ ≤ ℓc`` both ways at ℓ = 2..16: both directions stay below the factor-3
    curve, and the remove direction below the factor-1 expansion."""
    from scipy.special import logsumexp

    from fedtune.privacy.analysis.discrete_rdp import _log_moment

    def div(p: np.ndarray, r: np.ndarray, a: int) -> float:
        return float(logsumexp(a * np.log(p) + (1 - a) * np.log(r)) / (a - 1))

    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(2, 5))
        a0 = rng.dirichlet(np.ones(k) * rng.uniform(0.2, 3))
        b = rng.dirichlet(np.ones(k) * rng.uniform(0.2, 3))
        a0, b = np.maximum(a0, 1e-12), np.maximum(b, 1e-12)
        a0, b = a0 / a0.sum(), b / b.sum()
        c = max(max(div(a0, b, o), div(b, a0, o)) / o for o in range(2, 17))
        q = float(rng.choice([0.01, 0.1, 0.3, 0.6]))
        mix = (1 - q) * a0 + q * b
        for o in (2, 3, 5, 8, 16):
            both = _log_moment(o, q, c, factor=3.0) / (o - 1)
            remove = _log_moment(o, q, c, factor=1.0) / (o - 1)
            assert div(a0, mix, o) <= both * (1 + 1e-9)
            assert div(mix, a0, o) <= remove * (1 + 1e-9)
