"""Aggregation of both LoRA variants against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.aggregation import add_updates, prescale
from fedtune.errors import AggregationError
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.secure.plain import PlainCodec


def test_weighted_mean_by_hand() -> None:
    w0, w1 = np.array([1.0, 2.0]), np.array([4.0, -1.0])
    total = add_updates([(prescale(w0, 1), 1), (prescale(w1, 2), 2)])
    # (w0 * 1 + w1 * 2) / 3 = ([1 + 8] / 3, [2 - 2] / 3)
    np.testing.assert_allclose(total.mean(), [3.0, 0.0])
    assert total.num_examples == 3


def test_standard_lora_averages_a_and_b_separately() -> None:
    # Two clients, rank 1, a 2x2 layer: A is 1x2, B is 2x1, flattened as [A, B].
    a0, b0 = np.array([1.0, 0.0]), np.array([2.0, 0.0])
    a1, b1 = np.array([0.0, 1.0]), np.array([0.0, 4.0])
    total = add_updates([(prescale(np.r_[a0, b0], 3), 3), (prescale(np.r_[a1, b1], 1), 1)])
    mean = total.mean()
    np.testing.assert_allclose(mean[:2], [0.75, 0.25])  # (3 a0 + a1) / 4
    np.testing.assert_allclose(mean[2:], [1.5, 1.0])  # (3 b0 + b1) / 4
    # The product of the means is not the mean of the products (why FFA-LoRA exists):
    mean_of_products = (3 * np.outer(b0, a0) + np.outer(b1, a1)) / 4
    assert not np.allclose(np.outer(mean[2:], mean[:2]), mean_of_products)


def test_ffa_lora_mean_of_b_times_shared_a_is_exact() -> None:
    a = np.array([[1.0, 2.0]])  # frozen, shared by every client, never travels
    b0, b1 = np.array([[1.0], [0.0]]), np.array([[0.0], [3.0]])
    total = add_updates([(prescale(b0.ravel(), 1), 1), (prescale(b1.ravel(), 2), 2)])
    b_mean = total.mean().reshape(2, 1)
    np.testing.assert_allclose(b_mean, [[1 / 3], [2.0]])  # (b0 + 2 b1) / 3
    np.testing.assert_allclose(b_mean @ a, (b0 @ a + 2 * (b1 @ a)) / 3)


def test_bad_updates_are_rejected() -> None:
    with pytest.raises(AggregationError, match="No updates"):
        add_updates([])
    with pytest.raises(AggregationError, match=r"Update 1 has shape \(3,\), expected \(2,\)"):
        add_updates([(np.zeros(2), 1), (np.zeros(3), 1)])
    with pytest.raises(AggregationError, match="num_examples must be >= 1, got 0"):
        prescale(np.zeros(2), 0)


def test_plain_codec_adds_what_clients_sent_and_checks_payloads() -> None:
    codec = PlainCodec(length=3)
    p0, p1 = codec.encode(np.array([1.0, 2.0, 3.0])), codec.encode(np.array([0.5, 0.0, -3.0]))
    np.testing.assert_array_equal(codec.decode(codec.add([p0, p1])), [1.5, 2.0, 0.0])
    with pytest.raises(PayloadError, match="does not match this run's"):
        PlainCodec(length=4).validate(p0)
    with pytest.raises(PayloadError, match=r"one chunk of 24 bytes, got sizes \[23\]"):
        codec.validate({**p0, "chunks": [p0["chunks"][0][:-1]]})
    with pytest.raises(PayloadError, match="NaN or infinite"):
        codec.validate(codec.encode(np.array([np.nan, 0.0, 0.0])))
    with pytest.raises(PayloadError, match="payload keys must be"):
        codec.validate({"chunks": []})
