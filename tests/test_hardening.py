"""Issue 27's smaller items, each as the attack it stops, through the real entry points.

* metrics: a finite train-loss of 1.7e308 made the weighted mean ``Infinity`` in
  ``metrics.jsonl``; the writer accepted ``inf`` / ``NaN``;
* counts: one node claiming 50,000 evaluation (or training) examples beside 400-example
  clients decided the reported accuracy (``max-weight-factor``);
* reasons: 1 MiB error / decline reasons with ANSI codes and newlines were logged and
  stored verbatim;
* key files: under umask 000 ``fedtune keygen`` made 0777 folders and a 0666
  ``public.ctx``, and wrote through a planted ``public.ctx`` symlink;
* ids: the worker took the run id ``'١٢٣'`` as 123;
* the worker's receive limit comes from the largest adapter it serves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.apps.cli import main
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.secure.plain import PlainCodec

ANSI_REASON = "\x1b[2J\x1b[31mFAKE: node 1 leaked\nkeys\r\x07" + "A" * (1 << 20)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node: int, content: RecordDict | Error, kind: str = MessageType.TRAIN) -> Message:
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=kind))


def _update(codec: PlainCodec, node: int, n: int, **metrics: float) -> Message:
    return _reply(
        node,
        RecordDict(
            {
                "update": ConfigRecord(dict(codec.encode(np.ones(2) * n))),
                "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, **metrics}),
            }
        ),
    )


def _evaluation(node: int, n: int, loss: float, accuracy: float) -> Message:
    return _reply(
        node,
        RecordDict(
            {
                "metrics": MetricRecord(
                    {"num-examples": n, "eval-loss": loss, "eval-accuracy": accuracy}
                )
            }
        ),
        MessageType.EVALUATE,
    )


def _strategy(**kwargs: object) -> FedTuneStrategy:
    return FedTuneStrategy(
        codec=PlainCodec(length=2),
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_clients=1,
        seed=0,
        **kwargs,  # type: ignore[arg-type]
    )


# --- metrics ------------------------------------------------------------------------


def test_a_huge_finite_train_loss_never_makes_the_mean_infinite(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = _strategy()
    codec = PlainCodec(length=2)
    replies = [_update(codec, 1, 10, **{"train-loss": 1.7e308}), _update(codec, 2, 10)]
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and metrics["train-loss"] == 1.0  # before: inf
    assert "train-loss = 1.7e+308 is absurd" in strategy.last_train.dropped["node-1"]
    assert "absurd" in caplog.text


def test_an_absurd_evaluation_metric_drops_that_evaluation() -> None:
    strategy = _strategy()
    result = strategy.aggregate_evaluate(
        1, [_evaluation(1, 10, 1.0, 0.5), _evaluation(2, 10, 1e300, 0.5)]
    )
    assert result is not None and result["eval-loss"] == 1.0
    assert "eval-loss = 1e+300 is absurd" in strategy.last_evaluate.dropped["node-2"]


def test_weighted_mean_of_huge_finite_values_stays_finite() -> None:
    from fedtune.run.metrics import weighted_mean

    assert weighted_mean([(1.7e308, 2), (1.7e308, 2)]) == pytest.approx(1.7e308)
    assert weighted_mean([(1.0, 1), (3.0, 3)]) == pytest.approx((1.0 * 1 + 3.0 * 3) / 4)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_metrics_writer_refuses_non_finite_values(tmp_path: Path, bad: float) -> None:
    from fedtune.run.metrics import append_record

    path = tmp_path / "metrics.jsonl"
    append_record(path, {"round": 0, "eval-accuracy": 0.5})
    with pytest.raises(ValueError, match=r"key 'clients\.c1\.eval-loss' is .*finite numbers"):
        append_record(path, {"round": 1, "clients": {"c1": {"eval-loss": bad}}})
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"round": 0, "eval-accuracy": 0.5}


# --- counts -------------------------------------------------------------------------


def test_a_claimed_evaluation_count_cannot_decide_the_accuracy() -> None:
    # Before: 50,000 (= max-client-examples) was trusted as a weight and made the
    # reported accuracy 0.014 instead of 0.9.
    strategy = _strategy()
    result = strategy.aggregate_evaluate(
        1,
        [
            _evaluation(1, 400, 0.3, 0.9),
            _evaluation(2, 400, 0.3, 0.9),
            _evaluation(3, 50_000, 9.0, 0.0),
        ],
    )
    assert result is not None and result["eval-accuracy"] == pytest.approx(0.9)
    assert result["eval-examples"] == 800
    assert "more than `max-weight-factor` (4) x 400" in strategy.last_evaluate.dropped["node-3"]


def test_a_claimed_train_count_cannot_outweigh_the_others_by_more_than_the_factor() -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy()
    _, metrics = strategy.aggregate_train(
        1, [_update(codec, 1, 400), _update(codec, 2, 390), _update(codec, 3, 1601)]
    )
    assert metrics is not None and metrics["num-examples"] == 790
    assert "`max-weight-factor` (4) x 400" in strategy.last_train.dropped["node-3"]
    # At the factor exactly it is accepted; a low claim cannot push honest nodes out.
    strategy = _strategy()
    _, metrics = strategy.aggregate_train(
        1, [_update(codec, 1, 400), _update(codec, 2, 100), _update(codec, 3, 1)]
    )
    assert metrics is not None and metrics["num-examples"] == 501
    strategy = _strategy(max_weight_factor=0)  # off
    _, metrics = strategy.aggregate_train(1, [_update(codec, 1, 400), _update(codec, 2, 50_000)])
    assert metrics is not None and metrics["num-examples"] == 50_400


def test_an_evaluation_count_above_the_registered_limit_is_refused() -> None:
    strategy = _strategy(node_limits={2: 100}, max_weight_factor=0)
    result = strategy.aggregate_evaluate(
        1, [_evaluation(1, 400, 0.3, 0.9), _evaluation(2, 101, 0.3, 0.0)]
    )
    assert result is not None and result["eval-examples"] == 400
    assert "registered for node 2" in strategy.last_evaluate.dropped["node-2"]


def test_max_weight_factor_is_parsed_and_checked() -> None:
    from fedtune.config import ConfigError, parse_run_config

    assert parse_run_config({}).federation.max_weight_factor == 4.0
    assert parse_run_config({"max-weight-factor": 0}).federation.max_weight_factor == 0
    with pytest.raises(ConfigError, match=r"`max-weight-factor` must be >= 1.*got 0\.5"):
        parse_run_config({"max-weight-factor": 0.5})


def test_shipped_federations_fit_the_default_factor() -> None:
    # The Dirichlet split of simulations/noniid.toml (seed 42; sizes measured with
    # fedtune.data.partition.partition_indices): each size within 4x the others' median.
    sizes = [195, 250, 263, 393, 414, 485]
    for i, n in enumerate(sizes):
        others = sorted(sizes[:i] + sizes[i + 1 :])
        assert n <= 4.0 * others[len(others) // 2]


# --- reasons ------------------------------------------------------------------------


def _assert_clean(text: str) -> None:
    assert len(text) <= 400
    assert not any(ord(c) < 32 or ord(c) == 127 for c in text), repr(text[:80])


def test_error_and_decline_reasons_are_cut_and_stripped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    codec = PlainCodec(length=2)
    strategy = _strategy()
    declined = _reply(3, RecordDict({"info": ConfigRecord({"declined": ANSI_REASON})}))
    crashed = _reply(2, Error(code=2, reason=ANSI_REASON))
    with caplog.at_level(logging.INFO, logger="fedtune.server"):
        strategy.aggregate_train(1, [_update(codec, 1, 4), crashed, declined])
    dropped = strategy.last_train.dropped["node-2"]
    _assert_clean(dropped)
    assert "FAKE: node 1 leaked keys" in dropped and dropped.endswith("…")
    # A decline is one of the nodes' fixed codes; anything else is tabled as node-error.
    assert strategy.last_train.declined["node-3"] == "node-error"
    for record in caplog.records:
        _assert_clean(record.getMessage())


def test_clean_reason_keeps_a_plain_reason() -> None:
    from fedtune.apps.server.replies import clean_reason

    assert clean_reason("budget spent: ε 8.0 of 8.0") == "budget spent: ε 8.0 of 8.0"
    assert (
        clean_reason("a\u202eb\x1b]0;title\x07c\x9b31md") == "a bcd"
    )  # escapes removed, the override a space


# --- key files ----------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_keygen_modes_do_not_depend_on_the_umask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "keys"
    assert main(["keygen", "--out", str(out)]) == 0
    assert (_mode(tmp_path / "new"), _mode(out)) == (0o700, 0o700)  # before: 0777
    assert _mode(out / "secret.ctx") == 0o600
    assert _mode(out / "public.ctx") == 0o644  # before: 0666
    assert _mode(out / "fingerprint.txt") == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.txt", "public.ctx", "secret.ctx"]


def test_keygen_refuses_a_planted_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    out.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    (out / "public.ctx").symlink_to(target)
    capsys.readouterr()
    assert main(["keygen", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "public.ctx" in err and "symbolic link" in err and "never" in err
    assert not target.exists()  # before: the public context was written through the link
    assert not (out / "secret.ctx").exists()  # nothing written


def test_keygen_refuses_a_directory_others_may_write_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o777)
    capsys.readouterr()
    assert main(["keygen", "--out", str(out)]) == 2
    assert "writable by other users (mode 0777)" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.usefixtures("open_umask")
def test_node_key_parents_are_private_whatever_the_umask(tmp_path: Path) -> None:
    from fedtune.config import ConfigError
    from fedtune.deploy.pki import make_node_key

    key = make_node_key(tmp_path / "a" / "b", "node-1")
    assert (_mode(tmp_path / "a"), _mode(tmp_path / "a" / "b")) == (0o700, 0o700)
    assert (_mode(key.private), _mode(key.public)) == (0o600, 0o644)
    (tmp_path / "a" / "b" / "node-2.pub").symlink_to(tmp_path / "x")
    with pytest.raises(ConfigError, match="already exist"):
        make_node_key(tmp_path / "a" / "b", "node-2")
    assert not (tmp_path / "x").exists()


def test_write_key_file_never_follows_a_link(tmp_path: Path) -> None:
    from fedtune.errors import KeyFileExists
    from fedtune.keyfiles import write_key_file

    (tmp_path / "k").symlink_to(tmp_path / "target")
    with pytest.raises(KeyFileExists, match=r"'.*k' already exists \(a symbolic link\)"):
        write_key_file(tmp_path / "k", b"secret", 0o600)
    assert not (tmp_path / "target").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temporary file left


# --- ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["١٢٣", "１２３", "123 ", "+123", "", "1" * 21, 123])
def test_worker_takes_ascii_digit_run_ids_only(run_id: object) -> None:
    from fedtune.node.channel import REQUEST, RUN_CONFIG
    from fedtune.node.worker import _unwrap

    content = RecordDict(
        {
            REQUEST: ConfigRecord({"message-type": "train", "run-id": run_id}),  # type: ignore[dict-item]
            RUN_CONFIG: ConfigRecord({}),
        }
    )
    with pytest.raises(ValueError, match=r"run-id must be 1 to 20 ASCII digits 0-9, got"):
        _unwrap(content)


def test_worker_takes_a_plain_run_id() -> None:
    from fedtune.node.channel import REQUEST, RUN_CONFIG
    from fedtune.node.worker import _unwrap

    content = RecordDict(
        {
            REQUEST: ConfigRecord({"message-type": "evaluate", "run-id": "18446744073709551615"}),
            RUN_CONFIG: ConfigRecord({"seed": 1}),
        }
    )
    assert _unwrap(content) == ("evaluate", 2**64 - 1, {"seed": 1})


@pytest.mark.parametrize("bad", ["١=5", "1=５", "1=5,２=3"])
def test_node_limits_take_ascii_digits_only(bad: str) -> None:
    from fedtune.apps.server.app import parse_node_limits
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="`node-limits` entry"):
        parse_node_limits(bad)


# --- worker request size ------------------------------------------------------------


def test_a_request_over_the_receive_limit_is_refused_unread(tmp_path: Path) -> None:
    from fedtune.node.channel import (
        CHUNK_BYTES,
        HANDLE,
        HANDLE_STREAM,
        RECORD_SLACK_BYTES,
        OwnedBytes,
        chunks,
        max_request_bytes,
    )
    from fedtune.node.worker import NodeWorker, make_server

    calls: list[int] = []

    class Recording(NodeWorker):
        def _run(self, data: bytes | OwnedBytes, context: grpc.ServicerContext) -> bytes:
            calls.append(len(data.take() if isinstance(data, OwnedBytes) else data))
            return b""

    limit = max_request_bytes(100_000)  # 3.2 MB + 1 MiB
    server, _ = make_server(Recording({}), max_adapter_params=100_000)
    socket = tmp_path / "w.sock"
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stream = channel.stream_unary(HANDLE_STREAM)
            assert stream(chunks(b"x" * limit), timeout=10) == b""
            with pytest.raises(grpc.RpcError) as err:
                stream(chunks(b"x" * (limit + 1)), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than" in str(err.value.details())
            unary = channel.unary_unary(HANDLE)  # one message: at most one chunk
            assert unary(b"x" * CHUNK_BYTES, timeout=10) == b""
            with pytest.raises(grpc.RpcError) as err:
                unary(b"x" * (CHUNK_BYTES + RECORD_SLACK_BYTES + 1), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert calls == [limit, CHUNK_BYTES]  # the large ones never reached the round code
    finally:
        server.stop(grace=0).wait()


def test_max_request_bytes_is_checked() -> None:
    from fedtune.node.channel import max_request_bytes

    assert max_request_bytes(8) == 8 * 32 + (1 << 20)
    with pytest.raises(ValueError, match="max-adapter-params must be >= 1, got 0"):
        max_request_bytes(0)


@pytest.mark.parametrize("bad", ["١٠", "1_0", " 10", "１０"])
def test_run_config_integers_take_ascii_digits_only(bad: str) -> None:
    # The run config a node parses is the server's proposal: one spelling per value.
    from fedtune.config import ConfigError, parse_run_config

    assert parse_run_config({"num-rounds": "10"}).federation.num_rounds == 10
    with pytest.raises(ConfigError, match=r"`num-rounds` must be an integer, got"):
        parse_run_config({"num-rounds": bad})


# --- benchmarks/bench_encryption.py's mean check ------------------------------------


def test_bench_encryption_checks_the_mean_of_the_updates_the_clients_encoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Simulated clients share one model: reading it back after the round gave every
    # client the last one's adapter (the check printed 1.55e-02 "NOT met", for the
    # plaintext codec too). The check now uses the vectors the codecs encoded.
    import importlib.util

    from fedtune.train.state import TrainOutcome

    spec = importlib.util.spec_from_file_location(
        "bench_encryption", Path(__file__).parents[1] / "benchmarks" / "bench_encryption.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_encryption", bench)  # its dataclasses need it
    spec.loader.exec_module(bench)

    shared = {"adapter": np.zeros(3)}  # the one model all clients train

    class Client:
        def __init__(self, k: int, codec: object) -> None:
            self.k, self.codec, self.model = k, codec, shared

        def train(self, state: object, *, server_round: int) -> TrainOutcome:
            shared["adapter"] = np.full(3, float(self.k + 1))  # this client's adapter
            n = 10 * (self.k + 1)
            payload = self.codec.encode(shared["adapter"] * n)  # type: ignore[attr-defined]
            return TrainOutcome(payload=payload, num_examples=n, result=None)

    codecs = [bench.TimedCodec(PlainCodec(length=3)) for _ in range(2)]
    clients = [Client(k, c) for k, c in enumerate(codecs)]
    fed = bench.Federation("plain", clients, codecs, bench.TimedCodec(PlainCodec(length=3)))
    uploads = [bench.train_client(fed, i, 1) for i in range(2)]
    bench.serve(fed, uploads)
    bench.check_mean(fed, PlainCodec(length=3), uploads)
    np.testing.assert_allclose(fed.means[0], (1.0 * 10 + 2.0 * 20) / 30)  # 5/3
    assert fed.errors == [pytest.approx(0.0, abs=1e-12)]
