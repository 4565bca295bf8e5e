"""Accounting: composition history, calibration, budget checks, input validation."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("opacus")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedtune.privacy.accountant import AccountantState, compute_epsilon, epsilon_after  # noqa: E402
from fedtune.privacy.budget import SIGMA_MIN, calibrate_noise, check_budget  # noqa: E402

DELTA = 1e-5
RO = {"relation": "replace-one"}
PRV_RO = {"accountant": "prv", "relation": "replace-one"}


def _opacus(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return PRVAccountant() if kind == "prv" else RDPAccountant()


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_composed_history_equals_one_long_lived_opacus_accountant(kind: str) -> None:
    rounds = [(1.1, 0.02, 50), (1.1, 0.02, 50), (0.9, 0.05, 20), (1.1, 0.02, 50)]
    state = AccountantState()
    reference = _opacus(kind)
    for sigma, q, steps in rounds:
        state = state.compose(noise_multiplier=sigma, sample_rate=q, steps=steps)
        for _ in range(steps):  # what one PrivacyEngine would have seen, step by step
            reference.step(noise_multiplier=sigma, sample_rate=q)
    assert state.opacus_history() == reference.history
    assert state.total_steps == 170
    assert state.epsilon(
        delta=DELTA, accountant=kind, relation="add-remove"
    ) == reference.get_epsilon(delta=DELTA)


def test_fresh_accountant_per_round_would_under_count() -> None:
    one_round = AccountantState().compose(noise_multiplier=1.0, sample_rate=0.05, steps=40)
    three = one_round.compose(noise_multiplier=1.0, sample_rate=0.05, steps=40).compose(
        noise_multiplier=1.0, sample_rate=0.05, steps=40
    )
    assert three.epsilon(delta=DELTA, **PRV_RO) > 1.5 * one_round.epsilon(delta=DELTA, **PRV_RO)


def test_state_json_round_trip_is_exact() -> None:
    state = AccountantState().compose(noise_multiplier=0.1 + 0.2, sample_rate=1 / 3, steps=7)
    again = AccountantState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    assert AccountantState().epsilon(delta=DELTA, **PRV_RO) == 0.0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"history": "x"}, "`history` must be a list"),
        ({"history": [{"noise_multiplier": 1.0}]}, r"`history\[0\]` must have exactly the keys"),
        (
            {"history": [{"noise_multiplier": 1.0, "sample_rate": 2.0, "steps": 1}]},
            r"`sample_rate`.*got 2.0",
        ),
    ],
)
def test_state_from_bad_dict(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AccountantState.from_dict(data)


def test_budget_check_true_and_false() -> None:
    state = AccountantState().compose(noise_multiplier=1.0, sample_rate=0.02, steps=200)
    spent = state.epsilon(delta=DELTA, **PRV_RO)
    after = epsilon_after(
        state, noise_multiplier=1.0, sample_rate=0.02, steps=200, delta=DELTA, **PRV_RO
    )
    assert after > spent
    kw = dict(noise_multiplier=1.0, sample_rate=0.02, steps=200, delta=DELTA, **PRV_RO)
    fits = check_budget(state, budget_epsilon=after + 0.01, **kw)
    assert not fits.would_exceed and fits.spent_epsilon == spent
    assert fits.remaining_epsilon == pytest.approx(after + 0.01 - spent)
    refused = check_budget(state, budget_epsilon=(spent + after) / 2, **kw)
    assert refused.would_exceed
    # the check never mutates the state: the refused round is not spent
    assert state.epsilon(delta=DELTA, **PRV_RO) == spent


def test_prv_is_tighter_than_rdp_and_huge_grid_is_inf() -> None:
    hist = [(1.0, 0.01, 1000)]
    for relation in ("replace-one", "add-remove"):
        assert compute_epsilon(
            hist, delta=DELTA, accountant="prv", relation=relation
        ) < compute_epsilon(hist, delta=DELTA, accountant="rdp", relation=relation)
    # σ=0.5, q=0.5, 2000 steps asks Opacus' PRV for ~5e7 grid points (measured: OOM);
    # the guard answers inf, a valid if vacuous bound, and RDP still gives a number.
    bad = [(0.5, 0.5, 2000)]
    assert compute_epsilon(bad, delta=DELTA, accountant="prv", **RO) == math.inf
    assert math.isfinite(compute_epsilon(bad, delta=DELTA, accountant="rdp", **RO))


def _check_calibration(eps: float, q: float, steps: int, kind: str) -> None:
    sigma = calibrate_noise(
        target_epsilon=eps, target_delta=DELTA, sample_rate=q, steps=steps, accountant=kind, **RO
    )
    got = compute_epsilon([(sigma, q, steps)], delta=DELTA, accountant=kind, **RO)
    assert got <= eps, (sigma, got)
    # Within 10% of the target, unless σ sits at the bottom of the search range or just
    # above where the PRV grid guard answers inf (a valid bound, but a cliff in ε(σ)).
    guard = compute_epsilon([(sigma * 0.99, q, steps)], delta=DELTA, accountant=kind, **RO)
    assert got >= 0.9 * eps or sigma == SIGMA_MIN or guard == math.inf, (sigma, got)


_calibration_inputs = dict(
    eps=st.floats(0.5, 10.0),
    q=st.floats(1e-3, 0.5),
    steps=st.integers(1, 2000),
)


@settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(**_calibration_inputs)
def test_calibrated_sigma_meets_target_rdp(eps: float, q: float, steps: int) -> None:
    _check_calibration(eps, q, steps, "rdp")


# PRV costs 0.05-2 s per evaluation and calibration takes ~4-8 of them: few examples here,
# more under the slow marker.
@settings(
    max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(**_calibration_inputs)
def test_calibrated_sigma_meets_target_prv(eps: float, q: float, steps: int) -> None:
    _check_calibration(eps, q, steps, "prv")


@pytest.mark.slow
@settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(**_calibration_inputs)
def test_calibrated_sigma_meets_target_prv_many(eps: float, q: float, steps: int) -> None:
    _check_calibration(eps, q, steps, "prv")


def test_calibration_edges() -> None:
    # so loose that the bottom of the search range already meets it
    loose = compute_epsilon([(SIGMA_MIN, 0.001, 1)], delta=DELTA, accountant="prv", **RO)
    assert (
        calibrate_noise(
            target_epsilon=loose + 1,
            target_delta=DELTA,
            sample_rate=0.001,
            steps=1,
            accountant="prv",
            **RO,
        )
        == SIGMA_MIN
    )
    with pytest.raises(ValueError, match="`target_epsilon`=1e-06 is unreachable"):
        calibrate_noise(
            target_epsilon=1e-6,
            target_delta=DELTA,
            sample_rate=1.0,
            steps=10_000,
            accountant="rdp",
            **RO,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, r"`target_epsilon` must be a finite epsilon > 0, got 0.0"),
        ({"target_epsilon": -1.0}, r"`target_epsilon` must be a finite epsilon > 0, got -1.0"),
        ({"target_epsilon": math.inf}, r"`target_epsilon` must be a finite epsilon > 0, got inf"),
        ({"target_delta": 0.0}, r"`target_delta` must be a delta in \(0, 1\), got 0.0"),
        ({"target_delta": 1.0}, r"`target_delta` must be a delta in \(0, 1\), got 1.0"),
        (
            {"sample_rate": 0.0},
            r"`sample_rate` must be a sampling probability in \(0, 1\], got 0.0",
        ),
        (
            {"sample_rate": 1.5},
            r"`sample_rate` must be a sampling probability in \(0, 1\], got 1.5",
        ),
        ({"steps": 0}, r"`steps` must be an integer >= 1, got 0"),
        ({"steps": 2.5}, r"`steps` must be an integer >= 1, got 2.5"),
        (
            {"accountant": "gdp"},
            r"`accountant` must be one of \('prv', 'rdp', 'discrete-rdp'\), got 'gdp'",
        ),
        ({"epsilon_tolerance": 0}, r"`epsilon_tolerance` must be finite and > 0, got 0"),
    ],
)
def test_calibrate_bad_inputs(kwargs: dict, match: str) -> None:
    base = dict(
        target_epsilon=1.0, target_delta=DELTA, sample_rate=0.01, steps=100, accountant="prv", **RO
    )
    with pytest.raises(ValueError, match=match):
        calibrate_noise(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, r"`noise_multiplier` must be finite and > 0, got 0.0"),
        (
            {"sample_rate": -0.1},
            r"`sample_rate` must be a sampling probability in \(0, 1\], got -0.1",
        ),
        ({"steps": True}, r"`steps` must be an integer >= 1, got True"),
        ({"delta": 1.5}, r"`delta` must be a delta in \(0, 1\), got 1.5"),
        ({"delta": float("nan")}, r"`delta` must be a number, got nan"),
    ],
)
def test_epsilon_after_bad_inputs(kwargs: dict, match: str) -> None:
    base = dict(
        noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=DELTA, accountant="prv", **RO
    )
    with pytest.raises(ValueError, match=match):
        epsilon_after(AccountantState(), **{**base, **kwargs})


def test_budget_bad_input() -> None:
    with pytest.raises(ValueError, match=r"`budget_epsilon` must be a finite epsilon > 0, got -2"):
        check_budget(
            AccountantState(),
            budget_epsilon=-2,
            delta=DELTA,
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=1,
            accountant="prv",
            **RO,
        )


def test_positional_privacy_parameters_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        calibrate_noise(1.0, 1e-5, 0.01, 100)  # type: ignore[misc]


def test_relation_is_required_and_checked() -> None:
    with pytest.raises(TypeError):
        compute_epsilon([(1.0, 0.1, 1)], delta=DELTA, accountant="prv")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"`relation` must be one of .*got 'zero-out'"):
        compute_epsilon([(1.0, 0.1, 1)], delta=DELTA, accountant="prv", relation="zero-out")  # type: ignore[arg-type]


# Realistic histories: a private.toml client (σ from calibration, q = 64/400, 2 epochs of
# 6 steps, 5 rounds), a silos-private.toml silo at ε = 8 and ε = 1 (q = 512/9799, 19 steps
# a round, 3 rounds), a large silo, client-level rounds (q = 1), a mixed history.
REALISTIC = [
    [(1.83, 0.16, 60)],
    [(0.6875, 512 / 9799, 57)],
    [(2.9914, 512 / 9799, 57)],
    [(0.9, 0.004, 5000)],
    [(2.5, 1.0, 5)],
    [(1.2, 0.1, 50), (0.9, 0.05, 30), (3.0, 1.0, 2)],
]


def _pld(history: list[tuple[float, float, int]], relation: str) -> float:
    """Google's dp-accounting PLD: an implementation independent of Opacus and fedtune."""
    dpa = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    rel = {
        "replace-one": dpa.NeighboringRelation.REPLACE_ONE,
        "add-remove": dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
    }[relation]
    acc = PLDAccountant(neighboring_relation=rel, value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("history", REALISTIC)
@pytest.mark.parametrize("relation", ["replace-one", "add-remove"])
def test_prv_agrees_with_google_dp_accounting_pld(history: list, relation: str) -> None:
    ours = compute_epsilon(history, delta=DELTA, accountant="prv", relation=relation)
    pld = _pld(history, relation)
    # PRV reports estimate + 0.01; PLD at interval 1e-3 is pessimistic by about as much.
    assert pld - 0.005 <= ours <= pld + 0.03, (ours, pld)
    # RDP is an upper bound under either relation
    assert compute_epsilon(history, delta=DELTA, accountant="rdp", relation=relation) >= ours - 0.02


def test_replace_one_costs_more_than_add_remove_and_q1_is_sensitivity_two() -> None:
    hist = [(1.83, 0.16, 60)]
    ro = compute_epsilon(hist, delta=DELTA, accountant="prv", relation="replace-one")
    ar = compute_epsilon(hist, delta=DELTA, accountant="prv", relation="add-remove")
    assert ro > 1.2 * ar
    # q = 1: replacing one example moves the sum by 2C, i.e. add-remove at σ / 2
    full = compute_epsilon([(3.0, 1.0, 4)], delta=DELTA, accountant="prv", relation="replace-one")
    half = compute_epsilon([(1.5, 1.0, 4)], delta=DELTA, accountant="prv", relation="add-remove")
    assert full == pytest.approx(half, abs=0.03)
