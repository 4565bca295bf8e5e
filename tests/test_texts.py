"""Nothing data-dependent in any text a DP node sends (issue 26 part D).

The attack (issue 26): a server without the key adds a plaintext offset to ``c0`` of
an encrypted sum, sends it back as the global and reads the node's refusal: its text
named the decrypted value, and the refusal bit alone bisects one coordinate to any
precision. Verified aggregation (issue 27) pins ``c1`` to the listed uploads' seeds,
but ``c0`` is the server's to shift: SEAL's ``add_plain`` (TenSEAL's ``ckks_vector +
list``) adds an encoded plaintext to ``c0`` and leaves ``c1`` as it was, so such a
global passes verification and is decrypted.

Here deployed nodes (:func:`fedtune.node.round.handle`, ``deployed=True``) share the
secret context and the server is the real :class:`fedtune.apps.server.strategy.FedTuneStrategy`: it
adds their round-1 uploads, then adds a plaintext offset to entry 0 of the sum without
any key: small (within the movement bound), twice the bound (refused by it alone) and
large (beyond the value bound too), one per node. Under client-level DP (which needs
encryption and at least ``client-dp-tolerance + 1`` sampled clients; it is the level
whose refusals stay silent, and the test covers its DP-release accounting) the replies
must not differ in any way the server can read (fields, strings, counts, sizes),
while each node's guard records, locally, which it refused; under ``dp = "example"``
the large one is refused out loud with the fixed code ``global-refused`` and nothing
else (post-processing of DP releases).
Every field and string of every reply is a public constant, a fixed code, or an
accounted DP release.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from numpy.typing import NDArray

from fedtune import crypto
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.bounds import VALUE_BOUND
from fedtune.crypto._seal import scratch_dir, seal_dump, sealapi
from fedtune.crypto.payload import full_coefficients, load_ciphertext
from fedtune.crypto.seal_format import parse_ciphertext, serialize
from fedtune.messages import EVALUATE_FIELDS, TRAIN_FIELDS, check_reply
from fedtune.node.codes import CODES, NodeRefusal, code_of
from fedtune.node.round import handle, runtime_for
from fedtune.secure import verify
from fedtune.secure.ckks import CkksCodec
from tests.conftest import toy_rows

LABELS = "animal,food,tool"
SEQ = 16  # the run's and the nodes' own `max-seq-length`


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> crypto.KeyFiles:
    return crypto.save_keys(crypto.make_secret_context(), tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secret(keys: crypto.KeyFiles) -> Path:
    return keys.secret


def _run_config(tiny_model_dir: Path, dp: str = "example", clients: int = 2) -> dict[str, object]:
    return {
        "model-path": str(tiny_model_dir.resolve()),
        "label-names": LABELS,
        "max-seq-length": SEQ,
        "batch-size": 8,
        "learning-rate": 0.01,
        "seed": 3,
        "num-clients": clients,
        "min-clients": 2,
        "num-rounds": 3,
        "dp": dp,
        "noise-multiplier": 2.0,  # a budget of 8 lasts the rounds here
        "max-grad-norm": 0.1,  # client-level bound C(1 + σz) well inside the value bound
        "encryption": True,
    }


def _policy(tiny_model_dir: Path) -> dict[str, object]:
    """The node's own policy: the run's base model pinned, its token limit."""
    from fedtune.model.loading import model_digest

    pin = {"path": str(tiny_model_dir.resolve()), "sha256": model_digest(tiny_model_dir)}
    return {"models": [pin], "max-seq-length": SEQ}


def _node(
    root: Path, secret: Path, name: str, tiny_model_dir: Path, **extra: object
) -> dict[str, object]:
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
        **_policy(tiny_model_dir),
        **extra,
    }


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
    out: list[tuple[object, ...]] = []
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


def add_plain_to_c0(
    codec: CkksCodec, payload: dict[str, Any], offsets: NDArray[np.float64]
) -> dict[str, Any]:
    """The server's forgery, with the public context only: ``Enc(x) + offsets``.

    SEAL's ``Evaluator.add_plain`` (what TenSEAL's ``ckks_vector + list`` runs) adds the
    encoded plaintext to ``c0`` and leaves ``c1`` unchanged; the result is serialised
    as the strategy serialises a global (unseeded, zstd).
    """
    ctx, params = codec.context, codec.context.params
    padded = np.zeros(len(payload["chunks"]) * params.values_per_chunk)
    padded[: offsets.size] = offsets
    rows = (padded[0::2] + 1j * padded[1::2]).reshape(-1, params.slot_count)
    chunks = []
    with scratch_dir() as tmp:
        for i, (chunk, row) in enumerate(zip(payload["chunks"], rows, strict=True)):
            field = f"global.chunks[{i}]"
            sealed = load_ciphertext(ctx, chunk, field=field, directory=tmp)
            plain = sealapi().Plaintext()
            ctx._encoder.encode(row.tolist(), params.scale, plain)
            ctx._evaluator.add_plain_inplace(sealed, plain)
            parsed = parse_ciphertext(seal_dump(sealed.save, tmp), ctx.layout, field=field)
            chunks.append(serialize(ctx.layout, parsed, compress=True))
    return {**payload, "chunks": chunks}


def _coefficients(codec: CkksCodec, payload: dict[str, Any]) -> NDArray[np.uint64]:
    with scratch_dir() as tmp:
        return np.stack(
            [
                full_coefficients(codec.context, c, field="chunk", directory=tmp)
                for c in payload["chunks"]
            ]
        )


class Federation:
    """Two deployed key holders and the real server strategy (public context only)."""

    def __init__(
        self, tiny_model_dir: Path, root: Path, keys: crypto.KeyFiles, dp: str, names: list[str]
    ) -> None:
        self.run_config = _run_config(tiny_model_dir, dp, len(names))
        self.nodes = {n: _node(root, keys.secret, n, tiny_model_dir) for n in names}
        self.runtimes = {
            n: runtime_for(self.run_config, cfg, run_id=1, deployed=True)
            for n, cfg in self.nodes.items()
        }
        length = next(iter(self.runtimes.values())).initial.size
        self.strategy = FedTuneStrategy(
            codec=CkksCodec(crypto.load_context(keys.public, public=True), length=length),
            fraction_train=1,
            fraction_evaluate=1,
            min_clients=2,
            seed=0,
            client_dp_tolerance=1 if dp == "client" else None,
        )

    def handle(self, name: str, content: RecordDict) -> RecordDict:
        return handle(
            "train",
            content,
            run_config=self.run_config,
            node_config=self.nodes[name],
            run_id=1,
            deployed=True,
        )

    def first_round(self) -> dict[str, RecordDict]:
        """Round 1 through the strategy: both nodes train, the server adds the uploads."""
        sent = self.strategy._messages(1, list(range(1, len(self.nodes) + 1)), MessageType.TRAIN)
        replies = {n: self.handle(n, m.content) for n, m in zip(self.nodes, sent, strict=True)}
        self.strategy.aggregate_train(
            1, [Message(replies[n], reply_to=m) for n, m in zip(self.nodes, sent, strict=True)]
        )
        assert self.strategy.last_refusal == "", self.strategy.last_refusal
        assert len(self.strategy.global_receipts) == len(self.nodes)
        return replies

    def forged(self, offset: float) -> RecordDict:
        """Round 2's train message, its global's entry 0 shifted by ``offset`` (the mean)."""
        content = self.strategy._content(2, len(self.nodes), 1)
        record = dict(content.config_records["global"])
        payload: dict[str, Any] = {k: record[k] for k in ("chunks", "length", "fingerprint")}
        # The sum is decrypted, then divided by its `num-examples`: shift it by n * offset.
        n = self.strategy.global_examples
        shift = np.zeros(payload["length"])
        shift[0] = offset * n
        forged = add_plain_to_c0(self.strategy.codec, payload, shift)  # type: ignore[arg-type]
        honest, shifted = (_coefficients(self.strategy.codec, p) for p in (payload, forged))  # type: ignore[arg-type]
        np.testing.assert_array_equal(shifted[:, 1], honest[:, 1])  # c1 unchanged
        assert not np.array_equal(shifted[:, 0], honest[:, 0])  # c0 moved
        content["global"] = ConfigRecord({**record, **forged})
        return content

    def verifies(self, name: str, content: RecordDict) -> None:
        """Verification (receipts, tags, c1, names) accepts it: a fresh record of use."""
        runtime = self.runtimes[name]
        record = content.config_records["global"]
        payload = {k: record[k] for k in ("chunks", "length", "fingerprint")}
        verify.check_global(
            runtime.codec,
            record,
            payload,
            int(record["num-examples"]),  # type: ignore[arg-type]
            run=runtime.run_id,
            server_round=1,
            min_count=verify.min_uploads(
                min_clients=runtime.cfg.federation.min_clients, dp=runtime.cfg.privacy.dp
            ),
            used=verify.UsedGlobals(None),
        )


def _probe_offsets(federation: Federation) -> dict[str, float]:
    """Shifts of entry 0 of the mean: small (within the movement bound), twice the bound
    (refused by the movement bound only) and large (beyond the value bound too)."""
    bound = min(r.guard.bound for r in federation.runtimes.values())
    assert 3 * bound < VALUE_BOUND, bound  # the "edge" probe stays within the value bound
    return {"inside": min(1e-3, bound / 100), "edge": 2 * bound, "outside": 1000.0}


def test_a_dp_node_sends_only_public_constants_codes_and_accounted_values(
    tiny_model_dir: Path, tmp_path: Path, keys: crypto.KeyFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """Client-level DP (silent refusals). Three key holders, one per probe: a global
    lists their three distinct names (verification asks for ``max(min-clients, 2)``),
    and each node sees one global for round 1 (a second would be refused as such)."""
    names = ["node-inside", "node-edge", "node-outside"]
    fed = Federation(tiny_model_dir, tmp_path, keys, "client", names)
    replies = {f"{n.removeprefix('node-')}-1": r for n, r in fed.first_round().items()}
    with caplog.at_level("WARNING", logger="fedtune.client"):
        for label, offset in _probe_offsets(fed).items():
            content = fed.forged(offset)
            fed.verifies(f"node-{label}", content)
            replies[f"{label}-2"] = fed.handle(f"node-{label}", content)
    for label in ("inside", "edge", "outside"):  # evaluated, then trained from
        refused = {r for r, ok in fed.runtimes[f"node-{label}"].guard.history if not ok}
        assert refused == (set() if label == "inside" else {1}), label
    # Why, in the node's own log only: the edge probe by the movement bound alone.
    assert "round 1 is refused (moved " in caplog.text
    assert re.search(r"round 1 is refused \(\|w\| [\d.e+]+, outside \|w\| <= 64\)", caplog.text)
    # Only an accepted global is kept for the node's own export.
    assert (tmp_path / "node-inside" / "checkpoint").is_dir()
    assert not (tmp_path / "node-edge" / "checkpoint").exists()
    assert not (tmp_path / "node-outside" / "checkpoint").exists()
    # The refusal bit is not in the replies: same fields, strings, counts and sizes.
    assert _shape(replies["inside-2"]) == _shape(replies["edge-2"]) == _shape(replies["outside-2"])
    assert "evaluation" in replies["outside-2"] and "update" in replies["outside-2"]
    # Byte sizes: a seeded upload's c0 is uniform modulo q whatever it encrypts, so its
    # zstd size varies by a few bytes at random (measured: 32,314-32,331), not by path.
    chunks = [cast(list[bytes], dict(r["update"])["chunks"]) for r in replies.values()]
    sizes = [len(c) for listed in chunks for c in listed]
    assert max(sizes) - min(sizes) < 0.005 * max(sizes), sizes
    # Every field and every string of every reply.
    for label, reply in replies.items():
        strings, fields = _strings_and_fields(reply)
        check_reply(
            {k: dict(v) for k, v in reply.items()},
            phase="train",
            private=True,
            held_out=("eval-loss", "eval-accuracy"),
            evaluation="dp" if "evaluation" in reply else "held-out",
        )
        # The held-out metrics are a DP release (check_reply refused "held-out" above).
        released = {("evaluation", "num-examples"): "public"}
        for field in fields:
            status = released.get(field) or TRAIN_FIELDS.get(field)
            status = status or ("dp" if field[0] == "evaluation" else None)
            assert status in ("dp", "public"), (label, field)
        name = label.rsplit("-", 1)[0]
        fingerprint = dict(reply["update"])["fingerprint"]
        for s in strings:
            assert s in {f"node-{name}", fingerprint, ""} | set(CODES), (label, s)
        assert reply["info"]["declined"] == ""
    assert set(EVALUATE_FIELDS) <= {
        ("info", "client"),
        ("info", "declined"),
        ("info", "blame"),
        *{("metrics", k) for k in ("num-examples", "partition-id")},
    }


def test_under_example_level_dp_the_refusal_is_the_fixed_code_only(
    tiny_model_dir: Path, tmp_path: Path, keys: crypto.KeyFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """The same large shift under ``dp = "example"``: ``global-refused``, no value."""
    fed = Federation(tiny_model_dir, tmp_path, keys, "example", ["node-inside", "node-outside"])
    fed.first_round()
    offsets = _probe_offsets(fed)
    inside = fed.forged(offsets["inside"])
    fed.verifies("node-inside", inside)
    assert fed.handle("node-inside", inside)["info"]["declined"] == ""
    outside = fed.forged(offsets["outside"])
    fed.verifies("node-outside", outside)
    with caplog.at_level("WARNING", logger="fedtune.client"), pytest.raises(NodeRefusal) as err:
        fed.handle("node-outside", outside)
    assert err.value.args == ("global-refused",)
    assert str(err.value) == code_of(err.value) == "global-refused"
    assert "global-refused" in CODES
    # The details stay in the node's own log.
    assert "Movement guard: the global of round 1 is refused (|w| " in caplog.text
    assert {r for r, ok in fed.runtimes["node-outside"].guard.history if not ok} == {1}


def test_a_declined_round_sends_a_code_and_the_details_stay_in_the_log(
    tiny_model_dir: Path, tmp_path: Path, secret: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_config = _run_config(tiny_model_dir)
    node = _node(tmp_path, secret, "node-poor", tiny_model_dir, **{"epsilon-budget": 0.01})
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "sampled-clients": 1})})
    with caplog.at_level("WARNING", logger="fedtune.client"):
        reply = handle(
            "train", content, run_config=run_config, node_config=node, run_id=1, deployed=True
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
    from fedtune.apps.client.app import make_client_app

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
    from fedtune.apps.server.replies import error_code

    reason = "<class 'fedtune.node.codes.NodeRefusal'>:<'budget-spent'>"
    assert error_code(reason) == "budget-spent"
    assert error_code("<class 'fedtune.node.codes.NodeRefusal'>:<'moved 18.08'>") == "node-error"
    assert error_code("Node Unavailable") == "Node Unavailable"
