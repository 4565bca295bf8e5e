"""Encrypted aggregation through the same strategy code, and what the server cannot do."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import crypto
from fedtune.apps.server.app import server_codec
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.config import ModelConfig, parse_run_config
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.model import build_model, get_adapter_vector
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.verify import sign_upload


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> crypto.KeyFiles:
    return crypto.save_keys(crypto.make_secret_context(), tmp_path_factory.mktemp("keys"))


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node: int, payload: dict[str, object], n: int) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "update": ConfigRecord(payload),  # type: ignore[arg-type]
            "info": ConfigRecord({"client": f"client-{node}"}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
        }
    )
    return Message(content, reply_to=ins)


def test_server_adds_real_adapters_it_cannot_read(
    keys: crypto.KeyFiles, tiny_model_dir: Path
) -> None:
    # Three clients' real adapter vectors (different seeds), example counts 7, 120, 3000.
    vectors = [
        get_adapter_vector(
            build_model(ModelConfig(model_path=str(tiny_model_dir)), num_labels=3, seed=s)
        )
        for s in (1, 2, 3)
    ]
    counts = [7, 120, 3000]
    client = CkksCodec(crypto.load_context(keys.secret), length=vectors[0].size)
    server = CkksCodec(crypto.load_context(keys.public), length=vectors[0].size)
    assert client.can_decrypt and not server.can_decrypt
    strategy = FedTuneStrategy(
        codec=server,
        fraction_train=1,
        fraction_evaluate=1,
        min_clients=3,
        seed=0,
        max_weight_factor=0,  # counts 7 / 120 / 3000 on purpose: the weighting is under test
    )
    replies = [  # each upload tagged as a key holder does (fedtune.secure.verify)
        _reply(
            i,
            sign_upload(
                client,
                client.encode(v * n),
                run="r",
                server_round=1,
                name=f"client-{i}",
                num_examples=n,
            ),
            n,
        )
        for i, (v, n) in enumerate(zip(vectors, counts, strict=True))
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.global_payload is not None and strategy.global_examples == sum(counts)
    with pytest.raises(crypto.CryptoError, match="secret key"):
        server.decode(strategy.global_payload)
    mean = client.decode(strategy.global_payload) / strategy.global_examples
    expected = sum(v * n for v, n in zip(vectors, counts, strict=True)) / sum(counts)
    assert np.max(np.abs(mean - expected)) < 1e-6


def test_wrong_key_is_rejected_by_fingerprint(
    keys: crypto.KeyFiles, caplog: pytest.LogCaptureFixture
) -> None:
    server = CkksCodec(crypto.load_context(keys.public), length=10)
    stranger = CkksCodec(crypto.make_secret_context(), length=10)
    strategy = FedTuneStrategy(
        codec=server,
        fraction_train=1,
        fraction_evaluate=1,
        min_clients=1,
        seed=0,
    )
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        assert strategy.aggregate_train(1, [_reply(4, stranger.encode(np.ones(10)), 1)]) == (
            None,
            None,
        )
    assert "Dropped train reply from client-4 (node 4): payload fingerprint" in caplog.text
    with pytest.raises(PayloadError, match="does not match"):
        server.validate(stranger.encode(np.ones(10)))


def test_server_refuses_a_secret_context(keys: crypto.KeyFiles, tiny_model_dir: Path) -> None:
    cfg = parse_run_config({"model-path": str(tiny_model_dir), "label-names": "a,b,c"})
    assert isinstance(server_codec(cfg, {"public-context": str(keys.public)}), CkksCodec)
    with pytest.raises(
        crypto.CryptoError, match="holds a secret key; the server must only get the public context"
    ):
        server_codec(cfg, {"public-context": str(keys.secret)})


def test_public_context_file_holds_no_secret_key(keys: crypto.KeyFiles) -> None:
    secret = keys.secret.read_bytes()
    public = keys.public.read_bytes()
    assert keys.secret.stat().st_mode & 0o777 == 0o600
    key_part = secret.split(b"\n", 1)[1]  # a JSON header line, then the SEAL secret key
    assert len(key_part) > 1000
    assert not crypto.has_secret_key(crypto.load_context(keys.public))
    assert key_part[:64] not in public and key_part[-64:] not in public
