"""Key holders decrypt only verified sums (issue 27), through the deployment entry points.

Server side: :class:`fedtune.apps.server.strategy.FedTuneStrategy` (``aggregate_train`` adds the
replies, ``_content`` is what it sends). Key-holder side: :func:`fedtune.node.round.evaluate`
and :func:`fedtune.node.round.train`, what a node worker and a simulated client call.
Every attack here was accepted on the code before verified aggregation: the key holder
decrypted whatever global it was sent (or, for an upload under another key, decrypted
garbage and every node refused, halting the run).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import crypto
from fedtune.apps.server.strategy import FedTuneStrategy
from fedtune.config import parse_run_config
from fedtune.errors import WirePayloadError as PayloadError
from fedtune.node import round as node_round
from fedtune.secure import receipt_io, verify
from fedtune.secure.ckks import CkksCodec
from fedtune.train.runtime import ClientRuntime

RUN = "verified-run"
N = crypto.DEFAULT_PARAMS.poly_modulus_degree


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> crypto.KeyFiles:
    return crypto.save_keys(crypto.make_secret_context(), tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def holder(
    keys: crypto.KeyFiles, tiny_model_dir: Path, toy_csv: Path, tmp_path_factory: Any
) -> ClientRuntime:
    """A key holder (encryption on, DP off, min-clients 2)."""
    cfg = parse_run_config(
        {
            "model-path": str(tiny_model_dir),
            "data-path": str(toy_csv),
            "num-clients": 4,
            "min-clients": 2,
            "encryption": True,
            "label-names": "animal,food,tool",
        }
    )
    return ClientRuntime(
        cfg,
        partition_id=0,
        num_partitions=4,
        name="holder",
        secret_context=keys.secret,
        privacy_dir=tmp_path_factory.mktemp("privacy"),
        run_id=RUN,
    )


def _fresh(holder: ClientRuntime, tmp_path: Path) -> ClientRuntime:
    """The module's runtime with its own record of used globals (one per test)."""
    holder.privacy_dir = tmp_path
    return holder


def upload(
    codec: CkksCodec, name: str, n: int, server_round: int, seed: int, *, length: int
) -> dict[str, Any]:
    """An honest key holder's signed upload of a small vector times ``n``."""
    vec = np.random.default_rng(seed).uniform(-0.01, 0.01, length) * n
    return verify.sign_upload(
        codec, codec.encode(vec), run=RUN, server_round=server_round, name=name, num_examples=n
    )


def reply(node: int, name: str, payload: dict[str, Any], n: int) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "update": ConfigRecord(payload),  # type: ignore[arg-type]
            "info": ConfigRecord({"client": name}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content, reply_to=ins)


def server(keys: crypto.KeyFiles, length: int, min_clients: int = 2) -> FedTuneStrategy:
    codec = CkksCodec(crypto.load_context(keys.public, public=True), length=length)
    return FedTuneStrategy(
        codec=codec, fraction_train=1, fraction_evaluate=1, min_clients=min_clients, seed=0
    )


def round_of(
    holder: ClientRuntime, keys: crypto.KeyFiles, extra: list[Message] | None = None, k: int = 3
) -> FedTuneStrategy:
    """Round 1 on the server: ``k`` honest uploads (and ``extra`` replies) added."""
    length = holder.initial.size
    strategy = server(keys, length)
    honest = [
        reply(i, f"c{i}", upload(holder.codec, f"c{i}", 5 + i, 1, i, length=length), 5 + i)  # type: ignore[arg-type]
        for i in range(k)
    ]
    strategy.aggregate_train(1, honest + (extra or []))
    return strategy


def evaluate_content(strategy: FedTuneStrategy, server_round: int = 1) -> RecordDict:
    return strategy._content(server_round)


def test_honest_global_is_used_and_may_come_again(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    runtime = _fresh(holder, tmp_path)
    strategy = round_of(runtime, keys)
    assert [r.name for r in strategy.global_receipts] == ["c0", "c1", "c2"]
    content = evaluate_content(strategy)
    node_round.evaluate(runtime, content)
    node_round.evaluate(runtime, content)  # the same global again (a retry, or train r+1)
    assert (tmp_path / "holder.globals-used.json").is_file()


def test_upload_under_another_key_is_named_by_position(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    """The stranger copies the public fingerprint; the server cannot tell, a key holder can."""
    runtime = _fresh(holder, tmp_path)
    length = runtime.initial.size
    stranger = CkksCodec(crypto.make_secret_context(), length=length)
    forged = stranger.encode(np.full(length, 0.01))
    forged["fingerprint"] = runtime.codec.fingerprint
    forged["tag"] = bytes(32)  # no key: any guess
    strategy = round_of(runtime, keys, [reply(7, "mallory", forged, 3)])
    assert [r.name for r in strategy.global_receipts][-1] == "mallory"  # the server accepted it
    with pytest.raises(verify.GlobalRefused, match=r"^global-unverified:bad-tags:3$"):
        node_round.evaluate(runtime, evaluate_content(strategy))


def test_tampered_seed_and_bit_flips_are_named(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    runtime = _fresh(holder, tmp_path)
    length = runtime.initial.size
    honest = upload(runtime.codec, "c3", 4, 1, 9, length=length)  # type: ignore[arg-type]
    chunk = honest["chunks"][0]
    inner = bytearray(zstandard.ZstdDecompressor().decompress(chunk[16:]))
    inner[-1] ^= 0x01  # the seed's last byte
    out = bytearray(chunk[:16]) + zstandard.ZstdCompressor(level=3).compress(bytes(inner))
    struct.pack_into("<Q", out, 8, len(out))
    tampered = {**honest, "chunks": [bytes(out), *honest["chunks"][1:]]}
    strategy = round_of(runtime, keys, [reply(3, "c3", tampered, 4)])
    assert len(strategy.global_receipts) == 4  # passed every check the server can make
    with pytest.raises(verify.GlobalRefused, match=r"bad-tags:3$"):
        node_round.evaluate(runtime, evaluate_content(strategy))
    # zstd bit flips that still parse (issue 27: 341 of 4,200 fuzzed inputs)
    rng = np.random.default_rng(0)
    server_codec = server(keys, length).codec
    for _ in range(400):
        flipped = bytearray(chunk)
        pos = int(rng.integers(16, len(flipped)))
        flipped[pos] ^= 1 << int(rng.integers(8))
        candidate = {**honest, "chunks": [bytes(flipped), *honest["chunks"][1:]]}
        try:
            server_codec.validate({k: candidate[k] for k in ("chunks", "length", "fingerprint")})
        except PayloadError:
            continue
        break
    else:
        pytest.skip("no bit flip in 400 passed the server's checks")
    runtime.privacy_dir = tmp_path / "again"
    strategy = round_of(runtime, keys, [reply(3, "c3", candidate, 4)])
    with pytest.raises(verify.GlobalRefused, match=r"bad-tags:3$"):
        node_round.evaluate(runtime, evaluate_content(strategy))


def _plaintext_coeffs(ctx: crypto.CkksContext, values: np.ndarray) -> np.ndarray:
    """The NTT-form coefficients of CKKS-encoded ``values`` (no key needed)."""
    from fedtune.crypto._seal import scratch_dir, seal_dump, sealapi

    plain = sealapi().Plaintext()
    slots = (values[0::2] + 1j * values[1::2]).tolist()
    ctx._encoder.encode(slots, ctx.params.scale, plain)
    with scratch_dir() as tmp:
        raw = seal_dump(plain.save, tmp)
    members = zstandard.ZstdDecompressor().decompress(raw[16:]) if raw[5] == 2 else raw[16:]
    return np.frombuffer(members[-8 * N :], dtype="<u8")


def near_transparent(strategy: FedTuneStrategy, chosen: np.ndarray) -> dict[str, Any]:
    """The server's forgery: c1 = 1 (NTT form: all ones), c0 = Encode(chosen), any key."""
    from fedtune.crypto.seal_format import ParsedCiphertext, serialize

    ctx = strategy.codec.context  # type: ignore[attr-defined]
    length = strategy.global_payload["length"]  # type: ignore[index]
    chunks = []
    for i in range(len(strategy.global_payload["chunks"])):  # type: ignore[index]
        part = np.zeros(N)
        piece = chosen[i * N : (i + 1) * N]
        part[: piece.size] = piece
        data = np.stack([_plaintext_coeffs(ctx, part), np.ones(N, dtype=np.uint64)])
        parsed = ParsedCiphertext(data.reshape(2, 1, N).astype(np.uint64), None)
        chunks.append(serialize(ctx.layout, parsed, compress=True))
    return {"chunks": chunks, "length": length, "fingerprint": ctx.fingerprint}


def test_near_transparent_global_is_refused(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    runtime = _fresh(holder, tmp_path)
    strategy = round_of(runtime, keys)
    chosen = np.random.default_rng(5).uniform(-0.1, 0.1, runtime.initial.size)
    forged = near_transparent(strategy, chosen * strategy.global_examples)
    # What the attack did before: the key holder's codec decrypts it to the forger's values.
    decoded = runtime.codec.decode(runtime.codec.validate(forged, aggregate=True))
    # (to CKKS precision: about 1e-9, random per encryption)
    assert np.max(np.abs(decoded / strategy.global_examples - chosen)) < 1e-7
    strategy.global_payload = forged  # receipts of the honest round kept
    with pytest.raises(verify.GlobalRefused, match=r"^global-unverified:c1-mismatch$"):
        node_round.evaluate(runtime, evaluate_content(strategy))
    # ... and the server's resume check refuses it too (no key needed)
    fresh = server(keys, runtime.initial.size)
    with pytest.raises(PayloadError, match=r"c1 is not the sum of the 3 listed uploads' seeds"):
        fresh.resume(forged, strategy.global_examples, strategy.global_receipts)


def test_one_upload_passed_off_as_the_global_is_refused(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    runtime = _fresh(holder, tmp_path)
    strategy = round_of(runtime, keys)
    length = runtime.initial.size
    lone = upload(runtime.codec, "c0", 5, 1, 0, length=length)  # type: ignore[arg-type]
    receipt = strategy.global_receipts[0]
    # alone, with its own receipt: too few (min-clients 2; DP off)
    strategy.global_payload = {k: lone[k] for k in ("chunks", "length", "fingerprint")}
    strategy.global_receipts, strategy.global_examples = [receipt], 5
    with pytest.raises(verify.GlobalRefused, match=r"too-few-uploads$"):
        node_round.evaluate(runtime, evaluate_content(strategy))
    # alone, but listed with the others' receipts: its c1 is not their sum
    honest = round_of(runtime, keys)
    honest.global_payload = strategy.global_payload
    with pytest.raises(verify.GlobalRefused, match=r"c1-mismatch$"):
        node_round.evaluate(runtime, evaluate_content(honest))
    # listed twice (its c1 added twice): one name twice
    twice = server(keys, length)
    twice.global_receipts = [receipt, receipt]
    twice.global_payload = twice.codec.add([strategy.global_payload] * 2)
    twice.global_examples = 10
    with pytest.raises(verify.GlobalRefused, match=r"duplicate-name$"):
        node_round.evaluate(runtime, evaluate_content(twice))


def test_a_second_global_for_a_round_is_refused(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    """A subset of the round's uploads after the full sum: both valid, only one is used."""
    runtime = _fresh(holder, tmp_path)
    full = round_of(runtime, keys)
    node_round.evaluate(runtime, evaluate_content(full))
    subset = round_of(runtime, keys, k=2)
    with pytest.raises(verify.GlobalRefused, match=r"second-global-for-round$"):
        node_round.evaluate(runtime, evaluate_content(subset))


def test_old_round_and_lying_counts_and_no_receipts(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    runtime = _fresh(holder, tmp_path)
    strategy = round_of(runtime, keys)
    with pytest.raises(verify.GlobalRefused, match=r"bad-tags:0,1,2$"):  # round 1's uploads
        node_round.evaluate(runtime, evaluate_content(strategy, 2))
    strategy.global_examples += 1
    with pytest.raises(verify.GlobalRefused, match=r"examples-mismatch$"):
        node_round.evaluate(runtime, evaluate_content(strategy))
    strategy.global_examples -= 1
    strategy.global_receipts = []
    with pytest.raises(verify.GlobalRefused, match=r"no-receipts$"):
        node_round.evaluate(runtime, evaluate_content(strategy))


def test_server_drops_an_encrypted_upload_without_tag(
    holder: ClientRuntime, keys: crypto.KeyFiles, caplog: pytest.LogCaptureFixture
) -> None:
    length = holder.initial.size
    bare = holder.codec.encode(np.zeros(length))
    strategy = server(keys, length, min_clients=1)
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        strategy.aggregate_train(1, [reply(4, "old", bare, 1)])
    assert "Dropped train reply from old (node 4): update `tag` must be 32 bytes" in caplog.text


def test_receipts_bytes_round_trip_and_refuse_garbage() -> None:
    items = [verify.Receipt("a", 3, b"s" * 130, b"d" * 32, b"t" * 32)]
    data = receipt_io.receipts_to_bytes(items)
    assert receipt_io.receipts_from_bytes(data) == items
    with pytest.raises(PayloadError, match=r"receipts end inside receipt 0 tag"):
        receipt_io.receipts_from_bytes(data[:-1])
    with pytest.raises(PayloadError, match=r"1 bytes after the last one"):
        receipt_io.receipts_from_bytes(data + b"x")


def test_resume_refuses_forged_or_unlisted_checkpoints(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    """The server's resume path (``apps.server.app.resume_round``) over a signed checkpoint."""
    from fedtune.apps.server.app import resume_round
    from fedtune.errors import FederationError
    from fedtune.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    runtime = _fresh(holder, tmp_path / "node")
    honest = round_of(runtime, keys)
    assert honest.global_payload is not None
    length = runtime.initial.size

    def checkpoint(payload: dict[str, Any], receipts: list[verify.Receipt]) -> Path:
        run_dir = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        save_checkpoint(
            run_dir / "checkpoint",
            Checkpoint(1, payload, honest.global_examples, receipts=tuple(receipts)),
        )
        return run_dir

    good = checkpoint(honest.global_payload, honest.global_receipts)
    assert load_checkpoint(good / "checkpoint").receipts == tuple(honest.global_receipts)
    resumed = server(keys, length)
    assert resume_round(good, resumed, resume=True) == 2
    assert resumed.global_receipts == honest.global_receipts
    node_round.evaluate(runtime, evaluate_content(resumed))  # what it sends verifies
    forged = near_transparent(honest, np.random.default_rng(1).uniform(-1, 1, length))
    with pytest.raises(FederationError, match=r"c1 is not the sum of the 3 listed uploads"):
        resume_round(checkpoint(forged, honest.global_receipts), server(keys, length), resume=True)
    with pytest.raises(FederationError, match=r"lists no uploads \(receipts\)"):
        resume_round(checkpoint(honest.global_payload, []), server(keys, length), resume=True)


def test_blame_is_refused_without_example_level_dp(
    holder: ClientRuntime, keys: crypto.KeyFiles, tmp_path: Path
) -> None:
    from fedtune.node.verified import blame_reply
    from fedtune.secure.blame import BLAME_REFUSED, blame_to_record

    runtime = _fresh(holder, tmp_path)
    strategy = round_of(runtime, keys)
    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": 1, "blame-round": 1}),
            "blame": ConfigRecord(
                blame_to_record(strategy.global_uploads, strategy.global_receipts)  # type: ignore[arg-type]
            ),
        }
    )
    answer = blame_reply(runtime, content).config_records["info"]["blame"]
    assert answer == BLAME_REFUSED  # dp is off: no single upload is ever decrypted


def test_one_replacement_global_only_without_what_this_node_blamed() -> None:
    used = verify.UsedGlobals(None)
    used.claim("r/1", "digest-a", ["t0", "t1", "t2"])
    used.claim("r/1", "digest-a", ["t0", "t1", "t2"])  # the same again
    with pytest.raises(verify.GlobalRefused, match="second-global-for-round"):
        used.claim("r/1", "digest-b", ["t0", "t1"])  # a subset the node did not ask for
    used.note_blamed("r/1", ["t2"])
    with pytest.raises(verify.GlobalRefused, match="second-global-for-round"):
        used.claim("r/1", "digest-c", ["t1", "t2"])  # not the one it blamed
    used.claim("r/1", "digest-b", ["t0", "t1"])  # exactly the previous minus the blamed
    with pytest.raises(verify.GlobalRefused, match="second-global-for-round"):
        used.claim("r/1", "digest-d", ["t0"])  # one replacement per blame
