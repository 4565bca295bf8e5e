"""Bounded influence: the CKKS capacity check, the value bound, the key holders' check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune import bounds, crypto
from fedtune.config import ConfigError, FederationConfig, parse_run_config
from fedtune.train.runtime import ClientRuntime, GlobalState

CAPACITY = bounds.ckks_capacity(crypto.DEFAULT_PARAMS)


def test_default_capacity_is_two_to_the_24() -> None:
    # 59-bit modulus, scale 2**33: 2 ** (59 - 33 - 2); 2**24 / 64 = 262,144 examples.
    assert CAPACITY == 2.0**24 == 16_777_216
    assert bounds.max_total_examples(capacity=CAPACITY) == 262_144


def test_the_reported_wrap_is_refused_at_start() -> None:
    # The finding: 4 clients x 1e7 examples x |w| = 0.9 is 3.6e7, past the range.
    with pytest.raises(ConfigError, match=r"`num-clients` \(4\) x `max-client-examples`"):
        bounds.check_capacity(
            num_clients=4, max_client_examples=10_000_000, capacity=CAPACITY, value_bound=0.9
        )


def test_capacity_edge_by_hand() -> None:
    # 4 x 65,536 x 64 = 2**24 exactly fits; one more example per client does not.
    bounds.check_capacity(num_clients=4, max_client_examples=65_536, capacity=CAPACITY)
    with pytest.raises(ConfigError, match="at most 65536 \\(at most 262144 examples in all\\)"):
        bounds.check_capacity(num_clients=4, max_client_examples=65_537, capacity=CAPACITY)


def test_the_default_config_fits_the_default_parameters() -> None:
    fed = FederationConfig()
    bounds.check_capacity(
        num_clients=fed.num_clients, max_client_examples=fed.max_client_examples, capacity=CAPACITY
    )


def test_max_client_examples_is_validated() -> None:
    with pytest.raises(ConfigError, match="`max-client-examples` must be >= 1"):
        parse_run_config({"max-client-examples": 0})


def test_ckks_sum_at_capacity_decrypts_and_past_it_wraps() -> None:
    # Golden check of the bound itself: a sum of 2**24 per coordinate decrypts to within
    # 1e-3; the reported case, 4 x 9e6 = 3.6e7, wraps to about -3.1e7 (mean -0.78, not 0.9).
    # A full chunk of equal values: each polynomial coefficient then equals the value
    # (a short vector spreads over the coefficients and would not wrap).
    ctx = crypto.make_secret_context()
    public = crypto.public_context(ctx)

    def decrypted_sum(value: float, count: int) -> float:
        parts = [
            crypto.encrypt_vector(ctx, np.full(crypto.DEFAULT_PARAMS.values_per_chunk, value))
            for _ in range(count)
        ]
        total = crypto.sum_encrypted(public, parts)
        return float(crypto.decrypt_vector(ctx, total)[0])

    assert decrypted_sum(2.0**22, 4) == pytest.approx(2.0**24, abs=1e-3)
    wrapped = decrypted_sum(9e6, 4)
    assert wrapped < 0
    assert wrapped / 4e7 == pytest.approx(-0.78, abs=0.01)


def test_update_check_divides_by_the_count() -> None:
    bounds.check_update(np.array([256.0, -256.0]), 4)  # w = (64, -64): on the bound
    with pytest.raises(bounds.BoundError, match="magnitude 65; .*\\|w\\| <= 64"):
        bounds.check_update(np.array([260.0, 0.0]), 4)
    with pytest.raises(bounds.BoundError, match="1 NaN or infinite entries"):
        bounds.check_update(np.array([np.inf, 0.0]), 1)


@pytest.mark.parametrize(
    ("mean", "expected"),
    [
        ([0.0, 64.5], "magnitude 64.5"),
        ([np.nan, 0.0], "1 NaN or infinite entries"),
        ([-np.inf, np.inf], "2 NaN or infinite entries"),
    ],
)
def test_global_mean_check_names_what_it_found(mean: list[float], expected: str) -> None:
    with pytest.raises(bounds.BoundError, match=expected):
        bounds.check_global_mean(np.array(mean))
    bounds.check_global_mean(np.array([64.0, -64.0, 0.0]))


@pytest.fixture
def runtime(tiny_model_dir: Path, toy_csv: Path) -> ClientRuntime:
    """Client 0 of a two-client run on the tiny model (a key holder, plaintext codec)."""
    cfg = parse_run_config(
        {
            "model-path": str(tiny_model_dir),
            "data-path": str(toy_csv),
            "num-clients": 2,
            "label-names": "animal,food,tool",
        }
    )
    return ClientRuntime(cfg, partition_id=0, num_partitions=2)


def test_key_holder_refuses_a_scaled_global(runtime: ClientRuntime) -> None:
    size = runtime.initial.size
    honest = runtime.codec.encode(np.full(size, 0.5) * 3)
    np.testing.assert_allclose(runtime.global_vector(GlobalState(honest, 3), server_round=1), 0.5)
    # Entry 7 of one client's update scaled by 1000: the sum is 1.5 + 500, the mean
    # (1.5 + 500) / 3 = 167.17 > 64.
    total = np.full(size, 1.5)
    total[7] += 1000 * 0.5
    forged = GlobalState(runtime.codec.encode(total), 3)
    with pytest.raises(ValueError, match="magnitude 167.2, .*forged or scaled update"):
        runtime.global_vector(forged, server_round=2)
    with pytest.raises(ValueError, match="forged or scaled"):
        runtime.evaluate(forged, server_round=2)


def test_server_refuses_to_start_past_the_ckks_range() -> None:
    from fedtune.secure.ckks import CkksCodec
    from fedtune.secure.plain import PlainCodec
    from server.app import server_capacity

    codec = CkksCodec(crypto.public_context(crypto.make_secret_context()), length=8)
    # 6 x 50,000 x 64 = 1.92e7 > 2**24; 5 x 50,000 x 64 = 1.6e7 fits.
    too_many = parse_run_config({"num-clients": 6, "encryption": True})
    with pytest.raises(
        ConfigError, match="`num-clients` \\(6\\) x `max-client-examples` \\(50000\\)"
    ):
        server_capacity(too_many, codec)
    assert server_capacity(parse_run_config({"num-clients": 5}), codec) == 2.0**24
    # Client-level DP: every update claims 1 example, so 6 clients fit easily.
    client_dp = parse_run_config({"num-clients": 6, "encryption": True, "dp": "client"})
    assert server_capacity(client_dp, codec) == 2.0**24
    assert server_capacity(too_many, PlainCodec(length=8)) is None  # float64: no modulus


def _walk(start: np.ndarray, steps: list[float], seed: int = 0) -> list[np.ndarray]:
    """Globals that move by the given distances in random directions."""
    rng = np.random.default_rng(seed)
    out, g = [], start.copy()
    for length in steps:
        direction = rng.standard_normal(start.size)
        g = g + length * direction / np.linalg.norm(direction)
        out.append(g.copy())
    return out


def test_step_guard_refuses_a_jump_and_keeps_the_last_good_global(caplog) -> None:
    guard = bounds.StepGuard(10.0)
    g1, g2, g3 = _walk(np.zeros(50), [1.0, 0.8, 1.2])
    for rnd, g in enumerate((g1, g2, g3), start=1):
        guard.check(g, server_round=rnd)  # honest steps: accepted
    # One client's update scaled by 100 in round 4: the mean jumps ~30x the largest step.
    attacked = g3 + 30.0 * (g2 - g1) / np.linalg.norm(g2 - g1) * 1.2
    with pytest.raises(
        bounds.BoundError,
        match=r"round 4 moved 36 per round from the one of "
        r"round 3, 30 times the largest step accepted so far \(1\.2; "
        r"`max-step-factor` is 10\)",
    ):
        guard.check(attacked, server_round=4)
    # The refused global is not remembered: an honest round 4 is still compared with round 3.
    guard.check(g3 + (g3 - g2), server_round=4)
    # Seen again (train of round 5 carries the global of round 4): no step, accepted.
    guard.check(g3 + (g3 - g2), server_round=4)


def test_step_guard_counts_rounds_it_did_not_see() -> None:
    guard = bounds.StepGuard(10.0)
    g1, g2 = _walk(np.zeros(20), [1.0, 1.0])
    guard.check(g1, server_round=1)
    guard.check(g2, server_round=2)
    # Not sampled for rounds 3..11: 25 in 10 rounds is 2.5 per round, within 10 x 1.
    far = g2 + 25.0 * np.ones(20) / np.sqrt(20)
    guard.check(far, server_round=12)
    with pytest.raises(bounds.BoundError, match="round 13 moved 30"):
        guard.check(far + 30.0 * np.ones(20) / np.sqrt(20), server_round=13)


def test_step_guard_memory_survives_a_new_process_and_ignores_other_runs(tmp_path: Path) -> None:
    path = tmp_path / "step-guard.npz"
    g1, g2 = _walk(np.zeros(10), [1.0, 1.0])
    first = bounds.StepGuard(10.0, path=path, run="run-a/abc")
    first.check(g1, server_round=1)
    first.check(g2, server_round=2)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    jump = g2 + 50.0 * np.ones(10) / np.sqrt(10)
    with pytest.raises(bounds.BoundError):  # a fresh guard (a new ClientApp process) remembers
        bounds.StepGuard(10.0, path=path, run="run-a/abc").check(jump, server_round=3)
    # Another run (or another config) starts afresh; so does a switched-off check.
    bounds.StepGuard(10.0, path=path, run="run-b/abc").check(jump, server_round=3)
    bounds.StepGuard(0.0, path=path, run="run-b/abc").check(jump * 1e3, server_round=4)


def test_step_guard_ignores_an_unreadable_memory(tmp_path: Path, caplog) -> None:
    path = tmp_path / "step-guard.npz"
    path.write_bytes(b"PK\x03\x04 not a zip")
    guard = bounds.StepGuard(10.0, path=path, run="r")
    with caplog.at_level("WARNING", logger="fedtune.client"):
        guard.check(np.ones(4), server_round=1)
    assert "ignoring unreadable" in caplog.text
    guard.check(np.ones(4) * 1.5, server_round=2)  # the new memory was written


def test_max_step_factor_is_checked() -> None:
    with pytest.raises(ConfigError, match="`max-step-factor`.*0.5"):
        parse_run_config({"max-step-factor": 0.5})
    assert FederationConfig().max_step_factor == 10.0


def test_key_holder_refuses_a_global_that_jumps(runtime: ClientRuntime) -> None:
    size = runtime.initial.size
    start = runtime.initial
    steps = [start + 0.01 * k for k in range(1, 3)]  # honest: 0.01 * sqrt(size) per round
    for rnd, g in enumerate(steps, start=1):
        runtime.global_vector(GlobalState(runtime.codec.encode(g * 2), 2), server_round=rnd)
    # Round 3: one of two clients added 1 to every entry of its update, well inside
    # |w| <= 64: the mean moves 0.01 + 0.5 per entry, 51x the honest step.
    attacked = (steps[-1] + 0.01) * 2 + 1.0
    with pytest.raises(ValueError, match="round 3 moved .* 51 times the largest"):
        runtime.evaluate(GlobalState(runtime.codec.encode(attacked), 2), server_round=3)
    honest = (steps[-1] + 0.01) * 2  # the same round without the attacker still passes
    runtime.evaluate(GlobalState(runtime.codec.encode(honest), 2), server_round=3)
    assert np.sqrt(size) * 0.01 == pytest.approx(0.4634, abs=1e-4)
