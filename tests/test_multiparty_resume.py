"""The round side of ``ckks-multiparty`` across stops (issue 28, docs/multiparty.md).

* A key holder's round log on disk: after a restart the same request gets the same
  bytes, another request for an answered round is refused, a corrupt or linked log
  refuses to answer (fail closed).
* Dropouts between upload and decryption, on the in-process engine: a holder gone after
  uploading is not chosen (the ``ready`` probe), a holder that misses the request itself
  is asked the same request again; a server that asks a holder another quorum for a
  round is refused.
* Resume: a run stopped while its quorum was decrypting (after a checkpoint, or before
  the first) continues with ``--resume``, to the adapter an uninterrupted run gets
  (within the smudging noise).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedtune.apps.server import multiparty as server_mp
from fedtune.apps.server import quorum
from fedtune.apps.simulation import driver
from fedtune.apps.simulation.in_process import InProcessGrid, run_in_process
from fedtune.errors import FederationError, MultipartyFileError
from fedtune.node import round as node_round
from fedtune.secure.ckks import CkksCodec
from fedtune.secure.multiparty import files, rounds
from fedtune.secure.multiparty import protocol as mp
from fedtune.secure.multiparty.backend import write_keys
from fedtune.secure.verify import REPLACED, GlobalRefused
from fedtune.train.shared import clear_worker_cache

NAMES = ["a", "b", "c"]
LENGTH = 300


# -- the round log on disk --------------------------------------------------------------


def _party(keys: Path, name: str, rounds_dir: Path) -> mp.Party:
    """Party ``name`` as a fresh process builds it: from its files, its log on disk."""
    roster = files.load_roster(keys / "roster.json")
    party = files.load_party(keys / f"{name}.party", roster)
    files.keep_round_log(party, rounds_dir)
    return party


@pytest.fixture(scope="module")
def sums(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    keys = tmp_path_factory.mktemp("mp-keys")
    write_keys(keys, NAMES, run="run-log", threshold=2)
    roster = files.load_roster(keys / "roster.json")
    public = mp.public_context(roster)
    server = CkksCodec(public, length=LENGTH)
    receipts = []
    for name in NAMES:
        party = files.load_party(keys / f"{name}.party", roster)
        payload = server.validate(party.encrypt(np.full(LENGTH, 0.5)))
        sig = party.sign(payload, server_round=1, num_examples=3)
        receipts.append(mp.make_receipt(public, payload, sig, name=name, num_examples=3))
    return {"keys": keys, "receipts": tuple(receipts)}


def _request(sums: dict[str, Any], quorum: list[str]) -> mp.DecryptionRequest:
    return mp.DecryptionRequest(1, sums["receipts"], 9, tuple(quorum))


def test_round_log_survives_a_restart(sums: dict[str, Any], tmp_path: Path) -> None:
    """Answer, restart (new objects from the files), ask again: same bytes; another
    quorum for the same round: refused."""
    log_dir = tmp_path / "state" / "multiparty-rounds"
    first = rounds.answer(
        _party(sums["keys"], "a", log_dir), _request(sums, ["a", "b"]), min_count=2
    )
    (path,) = log_dir.glob("*/round-1.bin")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    restarted = _party(sums["keys"], "a", log_dir)
    again = rounds.answer(restarted, _request(sums, ["a", "b"]), min_count=2)
    assert again.partial.chunks == first.partial.chunks and again.signature == first.signature
    with pytest.raises(GlobalRefused, match=REPLACED):
        rounds.answer(_party(sums["keys"], "a", log_dir), _request(sums, ["a", "c"]), min_count=2)


def test_a_corrupt_or_linked_round_log_refuses_to_answer(
    sums: dict[str, Any], tmp_path: Path
) -> None:
    log_dir = tmp_path / "rounds"
    request = _request(sums, ["a", "b"])
    rounds.answer(_party(sums["keys"], "a", log_dir), request, min_count=2)
    (path,) = log_dir.glob("*/round-1.bin")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.chmod(0o600)
    os.replace(_write(tmp_path / "flipped", bytes(data)), path)
    with pytest.raises(MultipartyFileError, match="checksum.*fail closed"):
        rounds.answer(_party(sums["keys"], "a", log_dir), request, min_count=2)
    os.link(path, tmp_path / "second-name")  # a hard link: refused
    with pytest.raises(MultipartyFileError, match="one name"):
        rounds.answer(_party(sums["keys"], "a", log_dir), request, min_count=2)
    os.unlink(path)
    path.symlink_to(tmp_path / "second-name")  # a symbolic link: refused
    with pytest.raises(MultipartyFileError, match="symbolic link"):
        rounds.answer(_party(sums["keys"], "a", log_dir), request, min_count=2)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- the in-process engine: dropouts, a second quorum, resume ---------------------------


def _simulation(
    drop: Callable[[int, Message], bool], grids: list[InProcessGrid]
) -> Callable[..., None]:
    """Flower's ``run_simulation``, every node in this process; a message ``drop(node,
    msg)`` selects gets an error reply instead of an answer (a holder that is gone)."""
    return functools.partial(run_in_process, errors_as_replies=True, drop=drop, grids=grids)


def _run(
    monkeypatch: pytest.MonkeyPatch,
    flat: dict[str, Any],
    run_dir: Path,
    *,
    drop: Callable[[int, Message], bool] = lambda node, msg: False,
    resume: bool = False,
    grids: list[InProcessGrid] | None = None,
) -> driver.SimulationResult:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    clear_worker_cache()  # a fresh process: codecs and runtimes built again from files
    monkeypatch.setattr(node_round, "_RUNTIMES", {})
    sim = _simulation(drop, [] if grids is None else grids)
    monkeypatch.setattr("flwr.simulation.run_simulation", sim)
    return driver.simulate({} if resume else flat, run_dir=run_dir, resume=resume)


def _kind(msg: Message) -> str:
    records = msg.content.config_records
    return next((k for k in ("ready", "decrypt", "blame") if k in records), "round")


def _round(msg: Message) -> int:
    config = msg.content.config_records.get("config")
    return int(config.get("server-round", -1)) if config is not None else -1  # type: ignore[arg-type]


@pytest.fixture
def flat(tiny_model_dir: Path, toy_csv: Path) -> dict[str, Any]:
    return {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "num-clients": 3,
        "num-rounds": 2,
        "batch-size": 8,
        "max-examples": 60,
        "min-clients": 2,
        "encryption": True,
        "encryption-backend": "ckks-multiparty",
    }


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


@pytest.mark.slow
def test_a_holder_gone_after_uploading_is_not_chosen_and_a_second_quorum_is_refused(
    monkeypatch: pytest.MonkeyPatch, flat: dict[str, Any], tmp_path: Path
) -> None:
    """t = 2 of 3. client-0 (first by name) uploads in round 1, then answers neither the
    probe nor the request: the quorum is client-1, client-2 and the round completes. Then
    a server that asks client-1 for round 2 again with another quorum is refused."""
    run = tmp_path / "run"
    grids: list[InProcessGrid] = []
    result = _run(
        monkeypatch,
        flat,
        run,
        drop=lambda n, m: n == 1 and _round(m) == 1 and _kind(m) in ("ready", "decrypt"),
        grids=grids,
    )
    assert [r["round"] for r in result.records] == [0, 1, 2]
    pending = json.loads((run / server_mp.PENDING_DECRYPTION).read_text())
    assert pending["mp-round"] == 2
    kept = json.loads((run / server_mp.GLOBAL_FILE).read_text())
    assert kept["mp-round"] == 2
    logs = sorted(p.parent.parent.name for p in (run / "privacy").glob("*/*/round-1.bin"))
    assert logs == ["client-1.multiparty-rounds", "client-2.multiparty-rounds"]
    # A second, different quorum for round 2 (the saved request, another quorum).
    doc = server_mp.load_pending_decryption(run)
    assert doc is not None
    record: dict[str, Any] = {k: v for k, v in doc.items() if not k.startswith("sum-")}
    grid = grids[-1]
    names = {}
    for node_id in grid.get_node_ids():
        probe = Message(
            RecordDict({"config": ConfigRecord({"server-round": 2}), "ready": ConfigRecord({})}),
            dst_node_id=node_id,
            message_type=MessageType.EVALUATE,
        )
        (mid,) = grid.push_messages([probe])
        (reply,) = grid.pull_messages([mid])
        names[reply.content.config_records["info"]["client"]] = node_id
    assert record["mp-quorum"] == ["client-0", "client-1"]  # all live in round 2
    record["mp-quorum"] = ["client-1", "client-2"]
    ask = Message(
        RecordDict({"config": ConfigRecord({"server-round": 2}), "decrypt": ConfigRecord(record)}),
        dst_node_id=names["client-1"],
        message_type=MessageType.EVALUATE,
    )
    (mid,) = grid.push_messages([ask])
    (reply,) = grid.pull_messages([mid])
    assert reply.has_error() and REPLACED in reply.error.reason


@pytest.mark.slow
def test_a_missed_request_is_sent_again_and_resume_continues_the_run(
    monkeypatch: pytest.MonkeyPatch, flat: dict[str, Any], tmp_path: Path
) -> None:
    """Round 2's quorum is client-0, client-1 (all three live). client-1 misses the
    request; the server sends the same request again until `round-timeout` and stops,
    naming it, the request saved. ``--resume`` asks exactly it again: client-0 answers
    from its round log with the same bytes, client-1 answers now, and the run ends with
    the adapter of an uninterrupted run (within the smudging noise)."""
    monkeypatch.setattr(quorum, "RETRY_FIRST", 0.2)
    flat = {**flat, "round-timeout": 2.0}
    stopped = tmp_path / "stopped"
    with pytest.raises(FederationError, match=r"client-1.*round-timeout.*asks exactly it"):
        _run(
            monkeypatch,
            flat,
            stopped,
            drop=lambda n, m: n == 2 and _round(m) == 2 and _kind(m) == "decrypt",
        )
    doc = server_mp.load_pending_decryption(stopped)
    assert doc is not None and doc["mp-round"] == 2 and doc["mp-quorum"] == ["client-0", "client-1"]
    (log0,) = (stopped / "privacy" / "client-0.multiparty-rounds").glob("*/round-2.bin")
    before = log0.read_bytes()
    assert not list((stopped / "privacy" / "client-1.multiparty-rounds").glob("*/round-2.bin"))
    lines = [json.loads(x)["round"] for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert lines == [0, 1]

    result = _run(monkeypatch, flat, stopped, resume=True)
    assert [r["round"] for r in result.records] == [0, 1, 2]
    assert log0.read_bytes() == before  # answered once, from its log
    straight = _run(monkeypatch, flat, tmp_path / "straight").run_dir
    diff = _max_diff(_adapter(stopped), _adapter(straight))
    print("max |resumed - uninterrupted|:", diff)
    assert diff < 1e-3


@pytest.mark.slow
def test_resume_of_round_1s_decryption_without_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch, flat: dict[str, Any], tmp_path: Path
) -> None:
    """Stopped while round 1 was being decrypted: no checkpoint yet, only the saved
    request. ``--resume`` asks it again and trains round 2 once."""
    monkeypatch.setattr(quorum, "RETRY_FIRST", 0.2)
    flat = {**flat, "round-timeout": 1.0}
    run = tmp_path / "run"
    with pytest.raises(FederationError, match="client-0"):
        _run(monkeypatch, flat, run, drop=lambda n, m: n == 1 and _kind(m) == "decrypt")
    assert not (run / "checkpoint").exists()
    assert server_mp.pending_round(run) == 1
    result = _run(monkeypatch, flat, run, resume=True)
    assert [r["round"] for r in result.records] == [0, 1, 2]
    assert json.loads((run / server_mp.GLOBAL_FILE).read_text())["mp-round"] == 2
    assert "eval-accuracy" in result.records[-1]
