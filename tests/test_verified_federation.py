"""A federation of four nodes, one of them forging: every round completes without it.

The server is the ServerApp's own loop (:func:`fedtune.apps.server.app.run_rounds` with the strategy
``fedtune/apps/server/app.py`` builds); the three honest nodes answer through
:func:`fedtune.node.round.handle`, what a node worker and a simulated client call. The
grid delivers messages in process (Flower's ``Grid`` interface: push, pull, node ids).
The fourth node is an attacker that does not run fedtune's node code: each round it
sends an upload made under another key with the federation's public fingerprint copied
and a guessed tag. Before verified aggregation the server summed it, every key holder
decrypted garbage and the run stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import crypto
from fedtune.apps.server.app import run_rounds, server_capacity, server_codec
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.apps.simulation.in_process import InProcessGrid
from fedtune.config import WIRING_KEYS, parse_run_config, parse_wiring
from fedtune.node import round as node_round
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.verify import sign_upload

Handler = Callable[[Message], Message]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def honest(flat: dict[str, object], partition: int) -> Handler:
    def handle(msg: Message) -> Message:
        try:
            content = node_round.handle(
                msg.metadata.message_type,
                msg.content,
                run_config=flat,
                node_config={"partition-id": partition, "num-partitions": 4},
                run_id=1,
                deployed=False,
            )
        except Exception as err:  # what Flower does with a ClientApp exception
            return Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=msg)
        return Message(content, reply_to=msg)

    return handle


def forger(fingerprint: str, length: int, *, tag: bool) -> Handler:
    """A node without the run's key: its own key, the public fingerprint copied.

    ``tag``: it sends a guessed tag (else none, as every client did before tags).
    """
    stranger = CkksCodec(crypto.make_secret_context(), length=length)

    def handle(msg: Message) -> Message:
        payload = stranger.encode(np.full(length, 0.05 * 10))
        payload["fingerprint"] = fingerprint
        if tag:
            payload["tag"] = bytes(range(32))
        content = RecordDict(
            {
                "update": ConfigRecord(payload),  # type: ignore[arg-type]
                "info": ConfigRecord({"client": "mallory", "declined": ""}),
                "metrics": MetricRecord({"num-examples": 10, "partition-id": 3}),
            }
        )
        return Message(content, reply_to=msg)

    return handle


@pytest.mark.slow
@pytest.mark.parametrize("tag", [True, False], ids=["guessed-tag", "no-tag"])
def test_federation_completes_every_round_without_the_forging_node(
    tag: bool,
    tiny_model_dir: Path,
    toy_csv: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = crypto.save_keys(crypto.make_secret_context(), tmp_path / "keys")
    flat: dict[str, object] = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "label-names": "animal,food,tool",
        "num-clients": 4,
        "min-clients": 3,
        "num-rounds": 2,
        "batch-size": 8,
        "encryption": True,
        "secret-context": str(keys.secret),
        "run-dir": str(tmp_path / "run"),
        "run-id": "four-nodes",
    }
    cfg = parse_run_config(flat, ignore=WIRING_KEYS)
    wiring = parse_wiring({**flat, "public-context": str(keys.public)})
    codec = server_codec(cfg, wiring)
    strategy = FedTuneStrategy(
        codec=codec,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_clients=3,
        seed=0,
        capacity=server_capacity(cfg, codec),
    )
    length = codec.length  # type: ignore[attr-defined]
    nodes = {k + 1: honest(flat, k) for k in range(3)}
    nodes[4] = forger(codec.fingerprint, length, tag=tag)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        run_rounds(InProcessGrid(nodes), cfg, strategy, run_dir)  # type: ignore[arg-type]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert "eval-accuracy" in r, r  # every round evaluated by the key holders
    if tag:  # summed (the server cannot check a tag), then named by the key holders
        assert "Round 1: dropped the upload of mallory" in caplog.text
        assert "Round 2: dropped the upload of mallory" in caplog.text
        assert "mallory" in getattr(strategy, "unverified", ())
        for r in records[1:]:  # each round's line says which upload left its sum
            assert list(r["dropped-after-sum"]) == ["mallory"], r
    else:  # an encrypted upload without a tag is dropped on arrival
        assert "Dropped train reply from mallory (node 4): update `tag`" in caplog.text
    receipts = getattr(strategy, "global_receipts", [])
    assert sorted(x.name for x in receipts) == ["client-0", "client-1", "client-2"]


def out_of_bounds_key_holder(flat: dict[str, object], secret: Path, length: int) -> Handler:
    """A key holder whose uploads are well-formed and tagged, with every entry at 5,000.

    It answers everything else (blame requests included) with an error.
    """
    codec = CkksCodec(crypto.load_context(secret), length=length)

    def handle(msg: Message) -> Message:
        config = msg.content.config_records["config"]
        if msg.metadata.message_type != "train" or "blame" in msg.content.config_records:
            return Message(Error(code=2, reason="no"), reply_to=msg)
        server_round = int(config["server-round"])  # type: ignore[call-overload]
        payload = sign_upload(
            codec,
            codec.encode(np.full(length, 5000.0) * 10),
            run=str(flat["run-id"]),
            server_round=server_round,
            name="mallory",
            num_examples=10,
        )
        content = RecordDict(
            {
                "update": ConfigRecord(payload),  # type: ignore[arg-type]
                "info": ConfigRecord({"client": "mallory", "declined": ""}),
                "metrics": MetricRecord({"num-examples": 10, "partition-id": 3, "epsilon": 1.0}),
            }
        )
        return Message(content, reply_to=msg)

    return handle


@pytest.mark.slow
def test_blame_step_drops_an_out_of_bounds_key_holder_under_example_dp(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A well-formed upload from a key holder breaks the sum; the round completes without it."""
    keys = crypto.save_keys(crypto.make_secret_context(), tmp_path / "keys")
    flat: dict[str, object] = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "label-names": "animal,food,tool",
        "num-clients": 4,
        "min-clients": 3,
        "num-rounds": 2,
        "batch-size": 8,
        "encryption": True,
        "dp": "example",
        "secret-context": str(keys.secret),
        "run-dir": str(tmp_path / "run"),
        "run-id": "blame",
    }
    cfg = parse_run_config(flat, ignore=WIRING_KEYS)
    wiring = parse_wiring({**flat, "public-context": str(keys.public)})
    codec = server_codec(cfg, wiring)
    strategy = FedTuneStrategy(
        codec=codec,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_clients=3,
        seed=0,
        capacity=server_capacity(cfg, codec),
    )
    strategy.blame_allowed = True  # what fedtune/apps/server/app.py sets for dp = "example"
    length = codec.length  # type: ignore[attr-defined]
    nodes = {k + 1: honest(flat, k) for k in range(3)}
    nodes[4] = out_of_bounds_key_holder(flat, keys.secret, length)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.INFO, logger="fedtune.server"):
        run_rounds(InProcessGrid(nodes), cfg, strategy, run_dir)  # type: ignore[arg-type]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert "eval-accuracy" in r, r
    assert "Round 1: dropped the upload of mallory: key holders found it out of bounds" in (
        caplog.text
    )
    assert "out of bounds" in records[1]["dropped-after-sum"]["mallory"]
    assert sorted(x.name for x in strategy.global_receipts) == [
        "client-0",
        "client-1",
        "client-2",
    ]
