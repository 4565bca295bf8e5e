"""The client runtime: rounds are reproducible, and the global adapter is decoded right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedtune.aggregation import add_updates
from fedtune.config import parse_run_config
from fedtune.train.runtime import ClientRuntime, GlobalState


def _runtime(model: Path, data: Path, pid: int = 0) -> ClientRuntime:
    cfg = parse_run_config(
        {
            "model-path": str(model),
            "data-path": str(data),
            "num-clients": 2,
            "lora-dropout": 0.1,
            "batch-size": 8,
            "label-names": "animal,food,tool",
        }
    )
    return ClientRuntime(cfg, partition_id=pid, num_partitions=2)


def test_same_round_same_update_even_with_dropout(tiny_model_dir: Path, toy_csv: Path) -> None:
    runtime = _runtime(tiny_model_dir, toy_csv)
    torch.manual_seed(123)  # global RNG state must not matter
    a = runtime.train(None, server_round=1)
    torch.manual_seed(456)
    b = runtime.train(None, server_round=1)
    c = runtime.train(None, server_round=2)
    assert a.payload == b.payload
    assert a.payload != c.payload
    assert a.num_examples == runtime.num_train_examples == 48


def test_global_state_is_the_weighted_mean(tiny_model_dir: Path, toy_csv: Path) -> None:
    r0, r1 = _runtime(tiny_model_dir, toy_csv, 0), _runtime(tiny_model_dir, toy_csv, 1)
    u0, u1 = r0.train(None, server_round=1), r1.train(None, server_round=1)
    state = GlobalState(
        payload=r0.codec.add([u0.payload, u1.payload]),
        num_examples=u0.num_examples + u1.num_examples,
    )
    expected = add_updates(
        [
            (r0.codec.decode(u0.payload), u0.num_examples),
            (r1.codec.decode(u1.payload), u1.num_examples),
        ]
    ).mean()
    np.testing.assert_allclose(r0.global_vector(state, server_round=1), expected)
    np.testing.assert_array_equal(
        r0.global_vector(None, server_round=0), r1.global_vector(None, server_round=0)
    )  # same seeded init
