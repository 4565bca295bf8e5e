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


def test_key_holder_refuses_a_scaled_global_without_saying_so(
    runtime: ClientRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    size = runtime.initial.size
    honest = runtime.initial + 0.001
    got = runtime.global_vector(GlobalState(runtime.codec.encode(honest * 3), 3), server_round=1)
    np.testing.assert_allclose(got, honest)
    # Entry 7 of one client's update scaled by 1000: the sum is 1.5 + 500, the mean
    # (1.5 + 500) / 3 = 167.17 > 64. The old code raised a text naming 167.2.
    total = np.full(size, 1.5)
    total[7] += 1000 * 0.5
    forged = GlobalState(runtime.codec.encode(total), 3)
    with caplog.at_level("WARNING", logger="fedtune.client"):
        used = runtime.global_vector(forged, server_round=2)
    np.testing.assert_allclose(used, honest)  # the last accepted global, silently
    assert "the global of round 2 is refused (|w| 167.2, outside |w| <= 64)" in caplog.text
    result = runtime.evaluate(forged, server_round=2)  # answers as usual
    assert 0.0 <= result.accuracy <= 1.0


def test_server_refuses_to_start_past_the_ckks_range() -> None:
    from fedtune.apps.server.app import server_capacity
    from fedtune.secure.ckks import CkksCodec
    from fedtune.secure.plain import PlainCodec

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
