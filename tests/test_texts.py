"""Nothing data-dependent in any text a DP node sends (issue 26 part D).

The attack: a server without the key adds a plaintext offset to one coordinate of a
client's own upload, sends it back as the global and reads the refusal (its text
named the decrypted value; the refusal bit alone bisects it). Here a deployed DP
node with a CKKS key gets two such globals, one whose offset keeps it within the
bounds and one that does not: its two replies must not differ in any way the server
can read (fields, strings, counts, sizes), and every field and string of every reply
must be a public constant, a fixed code, or an accounted DP release.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import crypto
from fedtune.messages import EVALUATE_FIELDS, TRAIN_FIELDS, check_reply
from fedtune.node.codes import CODES, NodeRefusal, code_of
from fedtune.node.round import handle, runtime_for
from tests.conftest import toy_rows

LABELS = "animal,food,tool"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = crypto.save_keys(crypto.make_secret_context(), tmp_path_factory.mktemp("keys"))
    return keys.secret


def _run_config(tiny_model_dir: Path) -> dict[str, object]:
    return {
        "model-path": str(tiny_model_dir),
        "label-names": LABELS,
        "max-seq-length": 16,
        "batch-size": 8,
        "learning-rate": 0.01,
        "seed": 3,
        "num-clients": 2,
        "min-clients": 1,
        "num-rounds": 3,
        "dp": "example",
        "noise-multiplier": 1.0,
        "encryption": True,
    }


def _node(root: Path, secret: Path, name: str, **extra: object) -> dict[str, object]:
    state = root / name
    state.mkdir(parents=True)
    data = state / "own.csv"
    with data.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(toy_rows(8, seed=5))
    return {
        "state-dir": str(state),
        "data-path": str(data),
        "secret-context": str(secret),
        "name": name,
        **extra,
    }


def _train(r: int, state: dict[str, object] | None = None, n: int = 0) -> RecordDict:
    config: dict[str, int] = {"server-round": r, "sampled-clients": 1}
    records = {}
    if state is not None:
        config["evaluate-round"] = r - 1
        records["global"] = ConfigRecord({**state, "num-examples": n})  # type: ignore[dict-item]
    records["config"] = ConfigRecord(config)  # type: ignore[arg-type]
    return RecordDict(records)  # type: ignore[arg-type]


def _strings_and_fields(reply: RecordDict) -> tuple[list[str], set[tuple[str, str]]]:
    """Every ``(record, key)`` of a reply, and every string value in it."""
    strings, fields = [], set()
    for name, record in reply.items():
        for key, value in dict(record).items():
            fields.add((name, key))
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str):
                    strings.append(v)
    return strings, fields


def _shape(reply: RecordDict) -> object:
    """What the server can read of a reply besides DP values: names, strings, sizes."""
    out = []
    for name, record in sorted(reply.items()):
        for key, value in sorted(dict(record).items()):
            if (name, key) == ("info", "client"):
                continue  # the two probe nodes have their own names
            if isinstance(value, list):
                out.append((name, key, "list", len(value)))
            elif isinstance(value, (str, int)) and not isinstance(value, bool):
                out.append((name, key, type(value).__name__, value if key != "epsilon" else 0))
            else:
                out.append((name, key, type(value).__name__))
    return out


def test_a_dp_node_sends_only_public_constants_codes_and_accounted_values(
    tiny_model_dir: Path, tmp_path: Path, secret: Path
) -> None:
    run_config = _run_config(tiny_model_dir)
    replies: dict[str, RecordDict] = {}
    runtimes = {}
    probes = {"inside": 0.001, "outside": 1000.0}
    for label, offset in probes.items():
        node = _node(tmp_path, secret, f"node-{label}")
        runtime = runtime_for(run_config, node, run_id=1, deployed=True)
        first = handle(
            "train", _train(1), run_config=run_config, node_config=node, run_id=1, deployed=True
        )
        replies[f"{label}-1"] = first
        n = int(first.metric_records["metrics"]["num-examples"])
        # The server's forgery: the node's own upload plus a plaintext offset on entry 0
        # (with the key here only to build the ciphertext the offset on c0 would give).
        ctx = runtime.codec.context
        upload = dict(first.config_records["update"])
        total = crypto.decrypt_vector(ctx, crypto.EncryptedVector.from_wire(upload))
        total[0] += offset * n
        forged = crypto.encrypt_vector(ctx, total).to_wire()
        replies[f"{label}-2"] = handle(
            "train",
            _train(2, forged, n),
            run_config=run_config,
            node_config=node,
            run_id=1,
            deployed=True,
        )
        runtimes[label] = runtime
    for label, runtime in runtimes.items():  # evaluated, then trained from: checked twice
        refused = {r for r, ok in runtime.guard.history if not ok}
        assert refused == (set() if label == "inside" else {1})
    # Only an accepted global is kept for the node's own export.
    assert (tmp_path / "node-inside" / "checkpoint").is_dir()
    assert not (tmp_path / "node-outside" / "checkpoint").exists()
    # The refusal bit is not in the replies: same fields, strings, counts and sizes.
    assert _shape(replies["inside-2"]) == _shape(replies["outside-2"])
    assert "evaluation" in replies["outside-2"] and "update" in replies["outside-2"]
    # Every field and every string of every reply.
    for label, reply in replies.items():
        strings, fields = _strings_and_fields(reply)
        check_reply(
            {k: dict(v) for k, v in reply.items()},
            phase="train",
            private=True,
            held_out=("eval-loss", "eval-accuracy"),
        )
        for field in fields:
            status = TRAIN_FIELDS.get(field) or ("held-out" if field[0] == "evaluation" else None)
            assert status in ("dp", "public", "held-out"), (label, field)
        name = label.rsplit("-", 1)[0]
        fingerprint = dict(reply["update"])["fingerprint"]
        for s in strings:
            assert s in {f"node-{name}", fingerprint, ""} | set(CODES), (label, s)
        assert reply["info"]["declined"] == ""
    assert set(EVALUATE_FIELDS) <= {
        ("info", "client"),
        *{("metrics", k) for k in ("num-examples", "partition-id")},
    }


def test_a_declined_round_sends_a_code_and_the_details_stay_in_the_log(
    tiny_model_dir: Path, tmp_path: Path, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_config = _run_config(tiny_model_dir)
    node = _node(tmp_path, secret, "node-poor", **{"epsilon-budget": 0.01})
    with caplog.at_level("WARNING", logger="fedtune.client"):
        reply = handle(
            "train", _train(1), run_config=run_config, node_config=node, run_id=1, deployed=True
        )
    assert dict(reply["info"]) == {"client": "node-poor", "declined": "budget-spent"}
    assert set(reply) == {"info"}
    assert "privacy budget: round 1 would take epsilon from 0.000 to" in caplog.text
    with pytest.raises(
        ValueError, match=r"info.declined is 'privacy budget: .*not one of the fixed"
    ):
        check_reply(
            {"info": {"declined": "privacy budget: 0.3 > 0.01"}}, phase="train", private=True
        )


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (ValueError("moved 18.08 ... largest 0.04634"), "bad-request"),
        (RuntimeError("holds an entry of magnitude 779.9"), "node-error"),
        (NodeRefusal("budget-spent"), "budget-spent"),
        (NodeRefusal("not a code 779.9"), "node-error"),
    ],
)
def test_every_error_maps_to_a_fixed_code(err: Exception, code: str) -> None:
    assert code_of(err) == code
    assert str(NodeRefusal(code_of(err))) == code


def test_the_client_app_raises_only_a_code(
    tiny_model_dir: Path, toy_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from clients.app import make_client_app

    config = {
        **_run_config(tiny_model_dir),
        "data-path": str(toy_csv),
        "dp": "off",
        "encryption": False,
    }
    app = make_client_app(config)
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "evaluate-round": 7})})  # type: ignore[dict-item]
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    with caplog.at_level("WARNING", logger="fedtune.client"), pytest.raises(NodeRefusal) as err:
        app(msg, context)
    # Flower's error reason is "<class ...>:<'str(err)'>": the code, nothing else.
    assert str(err.value) == "bad-request"
    assert "asks to evaluate round 7 in the train message of round 1" in caplog.text
    np.testing.assert_equal(err.value.code, "bad-request")


def test_the_server_reads_the_code_from_an_error_reason() -> None:
    from server.replies import error_code

    reason = "<class 'fedtune.node.codes.NodeRefusal'>:<'budget-spent'>"
    assert error_code(reason) == "budget-spent"
    assert error_code("<class 'fedtune.node.codes.NodeRefusal'>:<'moved 18.08'>") == "node-error"
    assert error_code("Node Unavailable") == "Node Unavailable"
