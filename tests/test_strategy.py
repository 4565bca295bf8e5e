"""The server strategy: adds what clients sent, drops bad replies with a log line."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.secure.plain import PlainCodec


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages built outside a running app need an identity (run_simulation sets the same).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node: int, content: RecordDict | Error, kind: str = MessageType.TRAIN) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type=kind)
    return Message(content, reply_to=ins)


def _update(
    codec: PlainCodec, node: int, vector: list[float], n: int, **metrics: object
) -> Message:
    return _reply(
        node,
        RecordDict(
            {
                "update": ConfigRecord(dict(codec.encode(np.asarray(vector) * n))),
                "info": ConfigRecord({"client": f"client-{node}"}),
                "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, **metrics}),  # type: ignore[dict-item]
            }
        ),
    )


def _strategy(codec: PlainCodec, min_clients: int = 1, **limits: Any) -> FedTuneStrategy:
    """Full participation, seed 0; ``limits``: any other FedTuneStrategy keyword."""
    return FedTuneStrategy(
        codec=codec,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_clients=min_clients,
        seed=0,
        **limits,
    )


def test_sum_of_good_replies_by_hand() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    replies = [_update(codec, 1, [1.0, 2.0], 1), _update(codec, 2, [4.0, -1.0], 2)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and metrics["num-examples"] == 3
    assert strategy.global_payload is not None
    mean = codec.decode(strategy.global_payload) / strategy.global_examples
    np.testing.assert_allclose(mean, [3.0, 0.0])  # (w0 * 1 + w1 * 2) / 3


def test_bad_replies_are_dropped_and_named(caplog: pytest.LogCaptureFixture) -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    good = _update(codec, 1, [1.0, 1.0], 4)
    truncated = _update(codec, 2, [1.0, 1.0], 4)
    truncated.content.config_records["update"]["chunks"] = [b"\x00" * 15]
    wrong_key = _update(codec, 3, [1.0, 1.0], 4)
    wrong_key.content.config_records["update"]["fingerprint"] = "plain:other"
    zero_examples = _update(codec, 4, [1.0, 1.0], 1)
    zero_examples.content.metric_records["metrics"]["num-examples"] = 0
    no_update = _reply(
        5, RecordDict({"metrics": MetricRecord({"num-examples": 3, "train-loss": 0.1})})
    )
    crashed = _reply(6, Error(code=2, reason="boom"))
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        _, metrics = strategy.aggregate_train(
            1, [good, truncated, wrong_key, zero_examples, no_update, crashed]
        )
    assert metrics is not None and metrics["num-examples"] == 4
    assert list(strategy.last_train.accepted) == ["client-1"]
    dropped = strategy.last_train.dropped
    assert set(dropped) == {"client-2", "client-3", "client-4", "node-5", "node-6"}
    assert "one chunk of 16 bytes" in dropped["client-2"]
    assert "does not match" in dropped["client-3"]
    assert "num-examples must be an integer in [1," in dropped["client-4"]
    assert "no 'update' record" in dropped["node-5"]
    assert "boom" in dropped["node-6"]
    assert "Dropped train reply from client-2" in caplog.text


def test_too_few_usable_replies_keep_the_previous_state() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec, min_clients=2)
    arrays, metrics = strategy.aggregate_train(1, [_update(codec, 1, [1.0, 1.0], 2)])
    assert (arrays, metrics) == (None, None)
    assert strategy.global_payload is None


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [7, 8, 9]


def test_vanished_and_silent_nodes_are_named_by_the_node_they_were_sent_to() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    sent = list(strategy.configure_train(1, None, None, _Grid()))  # type: ignore[arg-type]
    for i, msg in enumerate(sent):  # what the grid does when it pushes them
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    good = _update(codec, 7, [1.0, 1.0], 2)
    good.metadata.__dict__["_reply_to_message_id"] = "m0"
    # The SuperLink answers for a node whose heartbeat stopped; its source is the SuperLink.
    vanished = Message(Error(code=5, reason="Node Unavailable"), reply_to=sent[1])
    vanished.metadata.__dict__["_src_node_id"] = 1
    _, metrics = strategy.aggregate_train(1, [good, vanished])  # node 9 never answered
    assert metrics is not None
    dropped = strategy.last_train.dropped
    assert dropped == {
        "node-8": "client error: Node Unavailable",
        "node-9": "no reply before `round-timeout`",
    }


def _dp_update(codec: PlainCodec, node: int, vector: list[float], n: int = 1) -> Message:
    """A DP client's reply: no training statistics, ε instead."""
    return _reply(
        node,
        RecordDict(
            {
                "update": ConfigRecord(dict(codec.encode(np.asarray(vector) * n))),
                "info": ConfigRecord({"client": f"client-{node}"}),
                "metrics": MetricRecord({"num-examples": n, "epsilon": 1.5}),
            }
        ),
    )


def test_train_messages_carry_the_sampled_count() -> None:
    strategy = _strategy(PlainCodec(length=2))
    messages = strategy._messages(3, [11, 12, 13], MessageType.TRAIN)
    assert [m.content.config_records["config"]["sampled-clients"] for m in messages] == [3] * 3
    evaluate = strategy._messages(3, [11, 12], MessageType.EVALUATE)
    assert "sampled-clients" not in evaluate[0].content.config_records["config"]


def test_dp_replies_without_train_loss_aggregate_and_report_none() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    _, metrics = strategy.aggregate_train(1, [_dp_update(codec, 1, [1.0, 1.0], 5)])
    assert metrics is not None and "train-loss" not in metrics
    assert strategy.last_train.accepted["client-1"] == {"num-examples": 5.0, "epsilon": 1.5}


def test_client_level_round_with_fewer_than_m_minus_t_shares_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec, client_dp_tolerance=1)
    strategy._messages(1, [1, 2, 3, 4], MessageType.TRAIN)  # m = 4 sampled, t = 1
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        _, metrics = strategy.aggregate_train(
            1, [_dp_update(codec, 1, [1.0, 0.0]), _dp_update(codec, 2, [0.0, 1.0])]
        )
    assert metrics is None and strategy.global_payload is None
    assert "2 of 4 sampled clients' noise shares arrived" in strategy.last_refusal
    assert "needs at least 3" in caplog.text
    replies = [_dp_update(codec, k, [1.0, 0.0]) for k in (1, 2, 3)]
    replies.append(_dp_update(codec, 4, [1.0, 0.0], n=7))  # a client-level reply must say n = 1
    _, metrics = strategy.aggregate_train(2, replies)
    assert metrics is not None and metrics["num-examples"] == 3
    assert "num-examples must be 1, got 7" in strategy.last_train.dropped["client-4"]


# --- Issue 11: replies keyed by node id, metrics range-checked, bounded influence ---------


def _named(
    codec: PlainCodec, node: int, name: str, vector: list[float], n: int, **metrics: object
) -> Message:
    msg = _update(codec, node, vector, n, **metrics)
    msg.content.config_records["info"]["client"] = name
    return msg


def _evaluation(node: int, name: str, n: int, loss: float, accuracy: float) -> Message:
    return _reply(
        node,
        RecordDict(
            {
                "info": ConfigRecord({"client": name}),
                "metrics": MetricRecord(
                    {"num-examples": n, "eval-loss": loss, "eval-accuracy": accuracy}
                ),
            }
        ),
        MessageType.EVALUATE,
    )


def test_a_copied_name_does_not_replace_the_honest_clients_entry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before the fix the table was keyed by the stated name: node 2 calling itself
    # client-1 replaced client-1's ε (1.5 -> 0.0) and both updates were added.
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    honest = _named(codec, 1, "client-1", [1.0, 1.0], 2, epsilon=1.5)
    spoof = _named(codec, 2, "client-1", [9.0, 9.0], 2, epsilon=0.0)
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        _, metrics = strategy.aggregate_train(1, [honest, spoof])
    assert metrics is not None and metrics["num-examples"] == 2  # node 1's 2 only
    assert strategy.last_train.accepted == {
        "client-1": {"num-examples": 2.0, "train-loss": 1.0, "epsilon": 1.5}
    }
    assert "already used by node 1" in strategy.last_train.dropped["client-1@2"]
    assert "client-1@2" in caplog.text
    # The name stays bound to node 1 for the rest of the run, in either phase and order.
    strategy.aggregate_train(2, [_named(codec, 2, "client-1", [0.0, 0.0], 1), honest])
    assert set(strategy.last_train.accepted) == {"client-1"}
    assert strategy.last_train.accepted["client-1"]["epsilon"] == 1.5
    strategy.aggregate_evaluate(2, [_evaluation(2, "client-1", 10, 0.0, 1.0)])
    assert strategy.last_evaluate.accepted == {}
    assert set(strategy.last_evaluate.dropped) == {"client-1@2"}


def test_a_node_keeps_its_first_name_and_errors_are_tabled_under_it() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    strategy.aggregate_train(1, [_named(codec, 3, "alice", [1.0, 0.0], 1)])
    _, metrics = strategy.aggregate_train(
        2, [_named(codec, 3, "bob", [1.0, 0.0], 1), _named(codec, 4, "carol", [0.0, 1.0], 1)]
    )
    assert metrics is not None and metrics["num-examples"] == 1
    assert "node 3 replied as 'alice' before" in strategy.last_train.dropped["bob@3"]
    strategy.aggregate_train(
        3, [_reply(3, Error(code=2, reason="boom")), _named(codec, 4, "carol", [0.0, 1.0], 1)]
    )
    assert strategy.last_train.dropped == {"alice": "client error: boom"}


def test_an_unprintable_or_claimed_fallback_name_is_keyed_by_node() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    squatter = _named(codec, 3, "node-5", [0.0, 0.0], 1)  # claims node 5's fallback label
    bad_name = _named(codec, 5, "evil\nname", [2.0, 2.0], 1)
    at_sign = _named(codec, 6, "x@7", [2.0, 2.0], 1)
    strategy.aggregate_train(1, [squatter, bad_name, at_sign])
    assert set(strategy.last_train.accepted) == {"node-5", "node-5@5", "node-6"}
    assert strategy.last_train.accepted["node-5@5"]["num-examples"] == 1.0


def test_a_second_reply_from_one_node_in_a_round_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before the fix both replies were added: num-examples 3 + 3 and mean of a doubled update.
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    first = _update(codec, 1, [1.0, 2.0], 3)
    again = _update(codec, 1, [5.0, 5.0], 3)
    other = _update(codec, 2, [4.0, -1.0], 1)
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        _, metrics = strategy.aggregate_train(1, [first, again, other])
    assert metrics is not None and metrics["num-examples"] == 4
    assert strategy.global_payload is not None
    mean = codec.decode(strategy.global_payload) / strategy.global_examples
    np.testing.assert_allclose(mean, [(1.0 * 3 + 4.0) / 4, (2.0 * 3 - 1.0) / 4])
    assert "second reply from node 1" in strategy.last_train.dropped["client-1@1"]
    assert "node 1" in caplog.text


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epsilon", float("nan"), "epsilon must be finite and >= 0"),
        ("epsilon", float("inf"), "epsilon must be finite and >= 0"),
        ("epsilon", -0.5, "epsilon must be finite and >= 0"),
        ("train-loss", float("inf"), "train-loss must be finite and >= 0"),
        ("train-loss", -1.0, "train-loss must be finite and >= 0"),
    ],
)
def test_train_metrics_out_of_range_drop_the_reply(key: str, value: float, expected: str) -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    bad = _update(codec, 2, [9.0, 9.0], 5, epsilon=1.0)
    bad.content.metric_records["metrics"][key] = value
    _, metrics = strategy.aggregate_train(1, [_update(codec, 1, [1.0, 1.0], 2, epsilon=1.0), bad])
    assert metrics is not None and metrics["num-examples"] == 2  # node 2 not added
    assert expected in strategy.last_train.dropped["client-2"]


@pytest.mark.parametrize(
    ("loss", "accuracy", "expected"),
    [
        (0.5, 1.5, "eval-accuracy must be in [0, 1]"),
        (0.5, -0.1, "eval-accuracy must be in [0, 1]"),
        (0.5, float("nan"), "eval-accuracy must be in [0, 1]"),
        (float("nan"), 0.5, "eval-loss must be finite and >= 0"),
        (-2.0, 0.5, "eval-loss must be finite and >= 0"),
    ],
)
def test_evaluation_metrics_out_of_range_drop_that_evaluation(
    loss: float, accuracy: float, expected: str
) -> None:
    strategy = _strategy(PlainCodec(length=2))
    result = strategy.aggregate_evaluate(
        1,
        [
            _evaluation(1, "a", 10, 1.0, 0.5),
            _evaluation(2, "b", 30, 2.0, 0.9),
            _evaluation(3, "c", 1000, loss, accuracy),
        ],
    )
    assert result is not None
    assert result["eval-examples"] == 40
    assert result["eval-loss"] == pytest.approx((1.0 * 10 + 2.0 * 30) / 40)  # 1.75
    assert result["eval-accuracy"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)  # 0.8
    assert expected in strategy.last_evaluate.dropped["c"]


def test_counts_above_the_configured_maximum_are_dropped() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec, max_client_examples=10)
    _, metrics = strategy.aggregate_train(
        1, [_update(codec, 1, [1.0, 1.0], 10), _update(codec, 2, [1.0, 1.0], 11)]
    )
    assert metrics is not None and metrics["num-examples"] == 10
    assert (
        "integer in [1, 10] (`max-client-examples`), got 11"
        in (strategy.last_train.dropped["client-2"])
    )


def test_a_node_is_held_to_the_limit_set_at_its_registration() -> None:
    # Node 1 was registered with --max-examples 5, node 2 without: node 2 may claim up
    # to max-client-examples, node 1 only 5, whatever either calls itself.
    codec = PlainCodec(length=2)
    strategy = _strategy(codec, max_client_examples=10, node_limits={1: 5})
    _, metrics = strategy.aggregate_train(
        1, [_update(codec, 1, [1.0, 1.0], 6), _update(codec, 2, [1.0, 1.0], 9)]
    )
    assert metrics is not None and metrics["num-examples"] == 9
    assert strategy.last_train.dropped["client-1"] == (
        "num-examples must be an integer in [1, 5] (`--max-examples` registered for node 1), "
        "got 6.0."
    )
    _, metrics = strategy.aggregate_train(
        2, [_update(codec, 1, [1.0, 1.0], 5), _update(codec, 2, [1.0, 1.0], 9)]
    )
    assert metrics is not None and metrics["num-examples"] == 14


def test_node_limits_wiring_key_is_parsed_strictly() -> None:
    from fedtune.apps.server.app import parse_node_limits
    from fedtune.config import ConfigError
    from fedtune.deploy.submit import format_node_limits

    assert parse_node_limits("") == {}
    assert parse_node_limits(format_node_limits({9: 50, 7: 100})) == {7: 100, 9: 50}
    for bad in ("7=0", "7", "x=3", "7=-1", "7=1e9", "7=3,=4"):
        with pytest.raises(ConfigError, match="`node-limits` entry"):
            parse_node_limits(bad)


def test_plaintext_updates_beyond_the_value_bound_are_dropped() -> None:
    # Before the fix two finite 1e308 updates summed to inf and became the global state.
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    huge = [_update(codec, k, [1e308, 0.0], 1) for k in (1, 2)]
    arrays, metrics = strategy.aggregate_train(1, huge)
    assert (arrays, metrics) == (None, None) and strategy.global_payload is None
    assert "magnitude 1e+308" in strategy.last_train.dropped["client-1"]
    # |w| <= 64 per coordinate after dividing by n: 64 * 4 / 4 passes, 65 does not.
    edge = _update(codec, 3, [64.0, -64.0], 4)
    over = _update(codec, 4, [65.0, 0.0], 4)
    _, metrics = strategy.aggregate_train(2, [edge, over])
    assert metrics is not None and metrics["num-examples"] == 4
    assert strategy.global_payload is not None
    np.testing.assert_allclose(codec.decode(strategy.global_payload), [256.0, -256.0])
    assert "|w| <= 64" in strategy.last_train.dropped["client-4"]


def test_updates_that_would_pass_the_ckks_range_are_dropped() -> None:
    # capacity 1000 at |w| <= 64 holds floor(1000 / 64) = 15 examples: 10 fits, 10 + 6 does not.
    codec = PlainCodec(length=2)
    strategy = _strategy(codec, capacity=1000.0)
    _, metrics = strategy.aggregate_train(
        1,
        [
            _update(codec, 1, [1.0, 1.0], 10),
            _update(codec, 2, [1.0, 1.0], 6),
            _update(codec, 3, [1.0, 1.0], 5),
        ],
    )
    assert metrics is not None and metrics["num-examples"] == 15
    assert "CKKS range" in strategy.last_train.dropped["client-2"]


def test_a_round_builds_messages_for_the_sampled_clients_only() -> None:
    """100,000 connected nodes, 50 sampled: 50 messages, and sampling takes well under a second."""
    import time

    class _Large:
        def get_node_ids(self) -> list[int]:
            return list(range(1, 100_001))

    codec = PlainCodec(length=2)
    strategy = FedTuneStrategy(
        codec=codec, fraction_train=0.0005, fraction_evaluate=0.0005, min_clients=2, seed=0
    )
    start = time.perf_counter()
    sent = list(strategy.configure_train(1, None, None, _Large()))  # type: ignore[arg-type]
    evaluate = list(strategy.configure_evaluate(1, None, None, _Large()))  # type: ignore[arg-type]
    assert time.perf_counter() - start < 1.0
    assert len(sent) == len(evaluate) == 50
    assert len({m.metadata.dst_node_id for m in sent}) == 50
    assert sent[0].content["config"]["sampled-clients"] == 50


def test_a_round_is_one_message_per_node_that_trains_and_evaluates() -> None:
    """configure_round: train messages ask the nodes sampled to evaluate for it too."""

    class _Six:
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13, 14, 15, 16]

    codec = PlainCodec(length=2)
    strategy = FedTuneStrategy(
        codec=codec, fraction_train=0.5, fraction_evaluate=0.5, min_clients=1, seed=4
    )
    # Who evaluates round 2's state: the nodes configure_evaluate(2) would pick.
    evaluators = {
        m.metadata.dst_node_id
        for m in strategy.configure_evaluate(2, None, None, _Six())  # type: ignore[arg-type]
    }
    messages = strategy.configure_round(3, _Six())  # type: ignore[arg-type]
    nodes = [m.metadata.dst_node_id for m in messages]
    assert len(nodes) == len(set(nodes))  # one message per node
    train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
    evaluate = [m for m in messages if m.metadata.message_type == MessageType.EVALUATE]
    assert len(train) == 3 and strategy.train_messages == train
    for m in train:
        config = m.content["config"]
        assert config["server-round"] == 3 and config["sampled-clients"] == 3
        asked = m.metadata.dst_node_id in evaluators
        assert ("evaluate-round" in config) == asked
        if asked:
            assert config["evaluate-round"] == 2
    assert {m.metadata.dst_node_id for m in evaluate} == evaluators - set(
        m.metadata.dst_node_id for m in train
    )
    assert all(m.content["config"]["server-round"] == 2 for m in evaluate)
    # Replies split by the message they answer: a train reply that evaluated is in both.
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"m{i}"
    replies = [Message(RecordDict(), reply_to=m) for m in messages]
    train_replies, evaluate_replies = strategy.split_replies(replies)
    assert [r.metadata.reply_to_message_id for r in train_replies] == [
        m.metadata.message_id for m in train
    ]
    assert len(evaluate_replies) == len(evaluators)


def test_the_evaluation_a_train_reply_carries_is_read_and_checked() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy(codec)
    good = _update(codec, 1, [1.0, 1.0], 4)
    good.content["evaluation"] = MetricRecord(
        {"num-examples": 5, "eval-loss": 0.5, "eval-accuracy": 0.8}
    )
    bad = _update(codec, 2, [1.0, 1.0], 4)
    bad.content["evaluation"] = MetricRecord(
        {"num-examples": 5, "eval-loss": 0.5, "eval-accuracy": 1.5}
    )
    missing = _update(codec, 3, [1.0, 1.0], 4)
    result = strategy.aggregate_evaluate(2, [good, bad, missing])
    assert result is not None and result["eval-accuracy"] == pytest.approx(0.8)
    dropped = strategy.last_evaluate.dropped
    assert "eval-accuracy must be in [0, 1]" in dropped["client-2"]
    assert "no metric 'num-examples' in its 'evaluation' record" in dropped["client-3"]
