"""Clients served by one worker process share its model and data, and nothing else leaks.

A simulation worker serves many clients with one base model (fedtune/train/shared.py).
What one client trained must not reach another: each client's update has to be exactly
what it would be in a process of its own, whichever clients ran before it there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config import ConfigError, parse_run_config
from fedtune.train.runtime import ClientRuntime, GlobalState
from fedtune.train.shared import clear_worker_cache, worker_cache


def _cfg(model: Path, data: Path, **extra: object):  # type: ignore[no-untyped-def]
    return parse_run_config(
        {
            "model-path": str(model),
            "data-path": str(data),
            "num-clients": 3,
            "batch-size": 8,
            "lora-dropout": 0.1,
            "label-names": "animal,food,tool",
            **extra,
        }
    )


def _client(cfg, pid: int, privacy_dir: Path | None = None) -> ClientRuntime:  # type: ignore[no-untyped-def]
    return ClientRuntime(
        cfg, partition_id=pid, num_partitions=3, privacy_dir=privacy_dir, run_id="iso"
    )


def _alone(cfg, pid: int, rounds: int, privacy_dir: Path | None = None) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """The decoded updates of client ``pid`` for rounds 1..rounds, in a fresh worker."""
    clear_worker_cache()
    client = _client(cfg, pid, privacy_dir)
    return _updates(client, rounds)


def _updates(client: ClientRuntime, rounds: int) -> list[np.ndarray]:
    out, state = [], None
    for rnd in range(1, rounds + 1):
        outcome = client.train(state, server_round=rnd)
        assert outcome.payload is not None
        out.append(client.codec.decode(outcome.payload))
        state = GlobalState(payload=outcome.payload, num_examples=outcome.num_examples)
    return out


def _no_grads(model: torch.nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dp", ["off", "example"])
def test_two_clients_on_one_worker_never_see_each_others_state(
    tiny_model_dir: Path, toy_csv: Path, tmp_path: Path, dp: str
) -> None:
    extra = {"dp": dp, "seeded-noise": True, "target-epsilon": 50.0} if dp != "off" else {}
    cfg = _cfg(tiny_model_dir, toy_csv, **extra)
    alone_a = _alone(cfg, 0, 2, tmp_path / "alone-a" if dp != "off" else None)
    alone_b = _alone(cfg, 1, 2, tmp_path / "alone-b" if dp != "off" else None)

    clear_worker_cache()
    shared_dir = tmp_path / "shared" if dp != "off" else None
    if shared_dir is not None:  # the same run nonces, so the seeded noise is the same
        shared_dir.mkdir()
        for pid, alone in ((0, "alone-a"), (1, "alone-b")):
            name = f"client-{pid}.runs.json"
            (shared_dir / name).write_bytes((tmp_path / alone / name).read_bytes())
            (shared_dir / name).chmod(0o600)
    a, b = _client(cfg, 0, shared_dir), _client(cfg, 1, shared_dir)
    assert a.model is b.model  # one model per worker
    # Interleaved on the one model: A round 1, B rounds 1-2, A round 2.
    ua1 = a.train(None, server_round=1)
    assert _no_grads(a.model)  # no gradient of A's data is left for B
    ub = _updates(b, 2)
    assert _no_grads(b.model)
    assert ua1.payload is not None
    state = GlobalState(payload=ua1.payload, num_examples=ua1.num_examples)
    ua2 = a.train(state, server_round=2)
    assert ua2.payload is not None
    together_a = [a.codec.decode(ua1.payload), a.codec.decode(ua2.payload)]
    for got, want in zip(together_a + ub, alone_a + alone_b, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(alone_a[0], alone_b[0])  # the clients did differ
    # Each client's ledger holds its own releases only.
    if dp != "off":
        assert len(a.ledger().records()) == 2 and len(b.ledger().records()) == 2
        assert a.plan is not b.plan


def test_partitions_are_disjoint_and_evaluation_uses_the_given_adapter(
    tiny_model_dir: Path, toy_csv: Path
) -> None:
    clear_worker_cache()
    cfg = _cfg(tiny_model_dir, toy_csv)
    a, b = _client(cfg, 0), _client(cfg, 1)
    # Everything trainable travels in the vector, the new classifier head included, and
    # nothing else is trainable: so nothing trained stays behind on the shared model.
    from fedtune.model import adapter_layout

    names = adapter_layout(a.model).names
    assert any("classifier" in n for n in names) and any("lora_A" in n for n in names)
    rows_a = {tuple(a.train_set[i]["input_ids"].tolist()) for i in range(len(a.train_set))}
    assert a.train_set is not b.train_set and a.test_set is not b.test_set
    assert len(a.train_set) == a.num_train_examples
    # B trains (and leaves its adapter on the shared model); A's evaluation of the
    # initial global is the same as before B trained.
    before = a.evaluate(None, server_round=0)
    b.train(None, server_round=1)
    after = a.evaluate(None, server_round=0)
    assert before == after
    assert rows_a  # (texts repeat in the toy data, so only the indices are disjoint)


def test_evicted_partitions_are_rebuilt_identically(tiny_model_dir: Path, toy_csv: Path) -> None:
    clear_worker_cache()
    cfg = _cfg(tiny_model_dir, toy_csv, **{"partition-cache-size": 1})
    a = _client(cfg, 0)
    first = a.train_set
    ids = [a.train_set[i]["input_ids"].tolist() for i in range(len(first))]
    b = _client(cfg, 1)  # evicts A's partition
    assert len(worker_cache().partitions) == 1
    builds = worker_cache().partitions.builds
    rebuilt = a.train_set
    assert rebuilt is not first and worker_cache().partitions.builds == builds + 1
    assert [rebuilt[i]["input_ids"].tolist() for i in range(len(rebuilt))] == ids
    assert b.num_train_examples + a.num_train_examples < 120


def test_partition_cache_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"`partition-cache-size` must be >= 1.*got 0"):
        parse_run_config({"partition-cache-size": 0})


def test_one_worker_reads_and_partitions_the_data_once(
    tiny_model_dir: Path, toy_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.data import sources

    clear_worker_cache()
    calls = []
    real = sources.read_table
    monkeypatch.setattr(sources, "read_table", lambda path: calls.append(path) or real(path))
    cfg = _cfg(tiny_model_dir, toy_csv)
    for pid in range(3):
        _client(cfg, pid)
    assert len(calls) == 1
