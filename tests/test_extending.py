"""Adding a task or an encryption backend: one module and one registration each.

The toy task and the toy codec below are what the README's developer note
describes; these tests check that client, server and export use them through the
registries without any of them naming the new task or backend.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedtune.config import ConfigError, parse_run_config
from fedtune.resolve import resolve
from fedtune.tasks import get_task, register_task, task_names, unregister_task
from fedtune.tasks.base import ClientDatasets
from fedtune.tasks.classification import EncodedDataset
from fedtune.tasks.defaults import TaskBase


# -- a toy task: "does the text name an animal?", data made in code ----------------------
# TOY TASK START (test_the_toy_task_fits_in_25_lines counts the lines up to the END mark)
class AnimalOrNot(TaskBase):
    """Binary keyword task: its data and one derived metric; the rest is TaskBase's."""

    name = "animal-or-not"

    def preflight(self, cfg: Any) -> Any:
        return replace(cfg, data=replace(cfg.data, label_names="other,animal"))

    def client_datasets(
        self, cfg: Any, tokenizer: Any, *, partition_id: int, num_partitions: int
    ) -> ClientDatasets:
        from conftest import toy_rows

        rows = toy_rows(20, seed=partition_id)
        texts, labels = [r["text"] for r in rows], [int(r["label"] == "animal") for r in rows]
        cut = len(texts) * 3 // 4
        encode = lambda s: EncodedDataset(tokenizer, texts[s], labels[s], max_length=16)  # noqa: E731
        return ClientDatasets(encode(slice(cut)), encode(slice(cut, None)), ["other", "animal"])

    def derive_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        record["eval-error"] = 1.0 - record["eval-accuracy"]
        return record

    def finish_run(self, run_dir: Path) -> None:
        (run_dir / "toy-finished").write_text("yes")  # TOY TASK END


def test_the_toy_task_fits_in_25_lines() -> None:
    """A new task is its data, its loss and its metrics (issue 30: at most 25 lines)."""
    text = Path(__file__).read_text()
    start, end = text.index("# TOY TASK START"), text.index("# TOY TASK END")
    lines = [line for line in text[start:end].splitlines()[1:] if line.strip()]
    assert len(lines) <= 25, len(lines)
    assert not {"evaluate", "load_base_model", "loss_fn"} & set(vars(AnimalOrNot))


@pytest.fixture
def toy_task() -> Iterator[str]:
    register_task(AnimalOrNot.name, AnimalOrNot)
    yield AnimalOrNot.name
    unregister_task(AnimalOrNot.name)


def test_a_registered_task_runs_through_the_client_without_a_branch(
    toy_task: str, tiny_model_dir: Path
) -> None:
    from fedtune.train.runtime import ClientRuntime, GlobalState

    assert toy_task in task_names() and get_task(toy_task).headline.key == "eval-accuracy"
    cfg = get_task(toy_task).preflight(
        parse_run_config(
            {
                "task": toy_task,
                "model-path": str(tiny_model_dir),
                "num-clients": 2,
                "batch-size": 8,
                "learning-rate": 0.05,
                "local-epochs": 3,
            }
        )
    )
    client = ClientRuntime(cfg, partition_id=0, num_partitions=2)
    assert client.label_names == ["other", "animal"] and client.num_train_examples == 45
    before = client.evaluate(None, server_round=0)
    out = client.train(None, server_round=1)
    assert out.payload is not None
    after = client.evaluate(GlobalState(out.payload, out.num_examples), server_round=1)
    assert after.loss < before.loss, (before, after)
    record = get_task(toy_task).derive_metrics({"eval-accuracy": after.accuracy})
    assert record["eval-error"] == pytest.approx(1.0 - after.accuracy)


def test_an_unknown_task_names_every_registered_one(toy_task: str) -> None:
    with pytest.raises(ConfigError, match=r"`task` must be one of .*animal-or-not, got 'nope'"):
        resolve({"task": "nope"})


# -- a toy codec: multiply by a secret scale (additively homomorphic, NOT secure) ---------


class ScaledCodec:
    """Float64 bytes of ``k * v``; ``k`` is the secret. A demonstration, not encryption."""

    def __init__(self, *, length: int, scale: float | None) -> None:
        self.length, self.scale = length, scale
        self.fingerprint = "scaled:" + hashlib.sha256(f"{length}".encode()).hexdigest()[:16]

    def encode(self, vector: NDArray[np.floating]) -> dict[str, Any]:
        assert self.scale is not None, "only a key holder encodes"
        data = (np.asarray(vector, dtype="<f8") * self.scale).tobytes()
        return {"chunks": [data], "length": self.length, "fingerprint": self.fingerprint}

    def validate(self, payload: object, *, aggregate: bool = False) -> dict[str, Any]:
        from fedtune.errors import WirePayloadError as PayloadError
        from fedtune.secure.codec import check_common

        checked = dict(check_common(payload, fingerprint=self.fingerprint, length=self.length))
        if [len(c) for c in checked["chunks"]] != [8 * self.length]:
            raise PayloadError("scaled payload must be one chunk of float64 values.")
        return checked

    def add(self, payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
        total = sum(np.frombuffer(p["chunks"][0], dtype="<f8") for p in payloads)
        data = np.asarray(total, dtype="<f8").tobytes()
        return {"chunks": [data], "length": self.length, "fingerprint": self.fingerprint}

    def decode(self, payload: dict[str, Any]) -> NDArray[np.float64]:
        assert self.scale is not None, "only a key holder decodes"
        return np.frombuffer(payload["chunks"][0], dtype="<f8") / self.scale


class ScaledBackend:
    name = "scaled"
    uses_keys = True

    def make_keys(self, directory: Path) -> Any:
        from types import SimpleNamespace

        directory.mkdir(parents=True, exist_ok=True)
        (directory / "secret.key").write_text("3.5")
        (directory / "public.key").write_text("")
        return SimpleNamespace(secret=directory / "secret.key", public=directory / "public.key")

    def codec(self, *, length: int, context: Path | None = None, public: bool = False) -> Any:
        text = context.read_text() if context is not None else ""
        if public and text:
            raise ValueError("the server must not hold the scale")
        return ScaledCodec(length=length, scale=None if public else float(text))


@pytest.fixture
def toy_codec() -> Iterator[str]:
    from fedtune.secure import register_backend, unregister_backend

    register_backend(ScaledBackend.name, ScaledBackend)
    yield ScaledBackend.name
    unregister_backend(ScaledBackend.name)


def test_a_registered_codec_is_used_by_client_server_and_export(
    toy_codec: str, tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    from fedtune.apps.server.app import server_codec
    from fedtune.secure import get_backend
    from fedtune.train.runtime import ClientRuntime, GlobalState

    flat = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "label-names": "animal,food,tool",
        "num-clients": 2,
        "batch-size": 8,
        "encryption": True,
        "encryption-backend": toy_codec,
    }
    cfg = parse_run_config(flat)
    assert cfg.crypto.codec_name == toy_codec
    keys = get_backend(toy_codec).make_keys(tmp_path / "keys")
    clients = [
        ClientRuntime(cfg, partition_id=k, num_partitions=2, secret_context=keys.secret)
        for k in (0, 1)
    ]
    server = server_codec(cfg, {"public-context": str(keys.public)})
    assert isinstance(server, ScaledCodec) and server.scale is None  # cannot decode
    outs = [c.train(None, server_round=1) for c in clients]
    total = server.add([server.validate(o.payload) for o in outs])
    state = GlobalState(total, sum(o.num_examples for o in outs))
    mean = clients[0].global_vector(state, server_round=1)
    plain = [c.codec.decode(o.payload) for c, o in zip(clients, outs, strict=True)]
    np.testing.assert_allclose(mean, sum(plain) / state.num_examples)
    with pytest.raises(ValueError, match="must not hold the scale"):
        server_codec(cfg, {"public-context": str(keys.secret)})


def test_the_strategy_checks_and_averages_a_tasks_own_held_out_metrics() -> None:
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.apps.server.strategy import FedTuneStrategy
    from fedtune.secure.plain import PlainCodec

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    metrics = {
        "eval-loss": (0.0, math.inf, "finite and >= 0"),
        "eval-margin": (-5.0, 5.0, "in [-5, 5]"),
    }
    strategy = FedTuneStrategy(
        codec=PlainCodec(length=2),
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_clients=1,
        seed=0,
        eval_metrics=metrics,
    )

    def reply(node: int, n: int, loss: float, margin: float) -> Message:
        ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        content = {"num-examples": n, "eval-loss": loss, "eval-margin": margin}
        return Message(
            RecordDict(
                {"info": ConfigRecord({"client": f"c{node}"}), "metrics": MetricRecord(content)}  # type: ignore[arg-type]
            ),
            reply_to=ins,
        )

    result = strategy.aggregate_evaluate(
        1, [reply(1, 10, 1.0, -1.0), reply(2, 30, 2.0, 3.0), reply(3, 5, 1.0, 9.0)]
    )
    assert result is not None and set(result) == {"eval-loss", "eval-margin", "eval-examples"}
    assert result["eval-margin"] == pytest.approx((-1.0 * 10 + 3.0 * 30) / 40)  # 2.0
    assert "eval-margin must be in [-5, 5]" in strategy.last_evaluate.dropped["c3"]
