"""``ckks-multiparty`` wired into a simulated federation (issue 28, docs/multiparty.md).

``fedtune simulate``'s driver with every party in this process (no Ray, as in
tests/test_run_counts.py): the ceremony among the 3 clients before round 1, each client
encrypting and signing under its own key, the server asking a quorum of 2 for signed
partial decryptions of each round's sum, every client combining the global itself, and
export from the kept partials. Compared with the same run without encryption.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedtune.apps.simulation import driver
from fedtune.apps.simulation.in_process import run_in_process
from fedtune.node import round as node_round
from fedtune.secure.multiparty.params import MultipartyParams
from fedtune.train.shared import clear_worker_cache

pytestmark = pytest.mark.slow


#: Flower's ``run_simulation``, every node in this process; a ClientApp exception becomes
#: an error reply, as Flower sends it (tests/test_run_counts.py lets it propagate).
_in_process_simulation = functools.partial(run_in_process, errors_as_replies=True)


def _run(monkeypatch: pytest.MonkeyPatch, flat: dict, run_dir: Path) -> driver.SimulationResult:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    clear_worker_cache()
    monkeypatch.setattr(node_round, "_RUNTIMES", {})
    monkeypatch.setattr("flwr.simulation.run_simulation", _in_process_simulation)
    return driver.simulate(flat, run_dir=run_dir)


def test_multiparty_simulation_matches_the_plain_run(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    flat = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "num-clients": 3,
        "num-rounds": 2,
        "batch-size": 8,
    }
    plain = _run(monkeypatch, dict(flat), tmp_path / "plain")
    multi = _run(
        monkeypatch,
        {**flat, "encryption": True, "encryption-backend": "ckks-multiparty"},
        tmp_path / "multi",
    )
    assert [r["round"] for r in multi.records] == [0, 1, 2]
    keys = tmp_path / "multi" / "keys"
    assert sorted(p.name for p in keys.glob("*.party")) == [f"client-{k}.party" for k in range(3)]
    assert not (keys / "secret.ctx").exists()  # no file holds a key that opens every upload
    a = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(multi.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # Error of a global: t = 2 holders' smudging on the sum, divided by the example count;
    # round 2 trains from round 1's slightly different global, so allow a wide margin.
    tol = 1e-3
    errs = [float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a]
    print("max |plain - multiparty| per tensor:", errs)
    assert max(errs) < tol, errs
    assert max(errs) > 0  # it went through CKKS, not a plaintext path
    # The server kept the last round's quorum and signed partials (export opened them).
    import json

    kept = json.loads((tmp_path / "multi" / "multiparty-global.json").read_text())
    assert kept["mp-round"] == 2 and len(kept["mp-quorum"]) == 2
    assert MultipartyParams().decoded_error_std(2) < 1e-4
    # `fedtune export` on the multiparty run: no --key, the kept signed partials open it.
    from fedtune.cli.dispatch import main

    assert main(["export", str(tmp_path / "multi"), "--out", str(tmp_path / "exported")]) == 0
    c = load_file(str(tmp_path / "exported" / "adapter_model.safetensors"))
    assert all(np.array_equal(b[k], c[k]) for k in b)


def test_an_unsigned_upload_is_dropped_at_the_decryption_step(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, toy_csv: Path, tmp_path: Path
) -> None:
    """client-1's round-1 upload carries a forged signature: the quorum refuses the sum
    naming it, the server drops it and asks again, the run completes without it."""
    from fedtune.secure.multiparty import node

    real = node.sign

    def forged(codec, payload, *, server_round, num_examples):  # type: ignore[no-untyped-def]
        signed = real(codec, payload, server_round=server_round, num_examples=num_examples)
        if codec.party.name == "client-1" and server_round == 1:
            return {**signed, "tag": bytes(64)}
        return signed

    monkeypatch.setattr(node, "sign", forged)
    flat = {
        "model-path": str(tiny_model_dir),
        "data-path": str(toy_csv),
        "num-clients": 3,
        "num-rounds": 2,
        "batch-size": 8,
        "min-clients": 2,
        "encryption": True,
        "encryption-backend": "ckks-multiparty",
    }
    result = _run(monkeypatch, flat, tmp_path / "run")
    by_round = {r["round"]: r for r in result.records}
    assert set(by_round[1].get("dropped-after-sum", {})) == {"client-1"}, by_round[1]
    assert "dropped-after-sum" not in by_round[2]
