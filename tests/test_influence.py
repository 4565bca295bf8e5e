"""Bounded influence through the real entry point: four deployed nodes, one malicious.

Each node runs :func:`fedtune.node.round.handle` with ``deployed=True`` on its own
data (the tiny config-built BERT, AdamW as in the quickstart); the test plays the
server, adding the plaintext updates. One node cheats: a +10 shift of a classifier
bias entry (issue 27: held-out accuracy 0.8475 -> 0.09 on the quickstart), or its
update scaled x50 in round 4. The key holders must carry on from the last global
they accepted, whatever ``max-step-factor`` the run config says.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedtune import model as fmodel
from fedtune.node.codes import NodeRefusal
from fedtune.node.round import handle, runtime_for
from fedtune.secure.plain import PlainCodec
from fedtune.train.runtime import ClientRuntime
from tests.conftest import toy_rows

LABELS = "animal,food,tool"
NODES = 4

Attack = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def _run_config(tiny_model_dir: Path, **extra: object) -> dict[str, object]:
    return {
        "model-path": str(tiny_model_dir.resolve()),
        "label-names": LABELS,
        "max-seq-length": 16,
        "batch-size": 8,
        "learning-rate": 0.01,
        "seed": 3,
        "num-clients": NODES,
        "min-clients": NODES,
        "num-rounds": 5,
        **extra,
    }


def _policy(tiny_model_dir: Path) -> dict[str, object]:
    """A deployed node's own policy: the run's base model pinned, its token limit."""
    from fedtune.model.loading import model_digest

    pin = {"path": str(tiny_model_dir.resolve()), "sha256": model_digest(tiny_model_dir)}
    return {"models": [pin], "max-seq-length": 16}


def _node_configs(root: Path, tiny_model_dir: Path) -> list[dict[str, object]]:
    out = []
    for i in range(NODES):
        state = root / f"node-{i}"
        state.mkdir(parents=True)
        data = state / "own.csv"
        with data.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(toy_rows(8, seed=10 + i))
        out.append(
            {
                "state-dir": str(state),
                "data-path": str(data),
                "name": f"node-{i}",
                **_policy(tiny_model_dir),
            }
        )
    return out


def _content(server_round: int, total: dict[str, object] | None, n: int) -> RecordDict:
    config: dict[str, int] = {"server-round": server_round, "sampled-clients": NODES}
    records: dict[str, ConfigRecord] = {}
    if total is not None:
        config["evaluate-round"] = server_round - 1
        records["global"] = ConfigRecord({**total, "num-examples": n})  # type: ignore[dict-item]
    records["config"] = ConfigRecord(config)  # type: ignore[arg-type]
    return RecordDict(records)  # type: ignore[arg-type]


def _federate(
    tiny_model_dir: Path,
    root: Path,
    rounds: int,
    attack: Attack | None = None,
    *,
    refusals: dict[int, list[str]] | None = None,
    **extra: object,
) -> tuple[list[np.ndarray], list[list[np.ndarray]], ClientRuntime]:
    """Globals (round 0 = initial) and each round's node updates ``w_k``; node 0 may cheat.

    A node's refusal (:class:`NodeRefusal`) ends the run; with ``refusals`` its codes
    (what the server reads) are kept there by round instead of raised.
    """
    run_config = _run_config(tiny_model_dir, **extra)
    nodes = _node_configs(root, tiny_model_dir)
    runtime = runtime_for(run_config, nodes[0], run_id=1, deployed=True)
    codec = PlainCodec(length=runtime.initial.size)
    globals_, updates = [runtime.initial.copy()], []
    total: dict[str, object] | None = None
    n_total = 0
    for r in range(1, rounds + 1):
        replies, codes = [], []
        for node in nodes:
            try:
                replies.append(
                    handle(
                        "train",
                        _content(r, total, n_total),
                        run_config=run_config,
                        node_config=node,
                        run_id=1,
                        deployed=True,
                    )
                )
            except NodeRefusal as err:  # what the server reads of a failed reply
                codes.append(str(err))
        if codes:
            if refusals is None:
                raise NodeRefusal(codes[0])
            refusals[r] = codes
            break
        counts = [cast(int, rep.metric_records["metrics"]["num-examples"]) for rep in replies]
        vectors = [
            codec.decode(dict(rep.config_records["update"])) / n  # type: ignore[arg-type]
            for rep, n in zip(replies, counts, strict=True)
        ]
        if attack is not None:
            vectors[0] = attack(r, vectors[0], globals_[-1])
        updates.append(vectors)
        n_total = sum(counts)
        summed = np.sum([v * n for v, n in zip(vectors, counts, strict=True)], axis=0)
        total = dict(codec.encode(summed))
        globals_.append(summed / n_total)
    return globals_, updates, runtime_for(run_config, nodes[1], run_id=1, deployed=True)


def _bias_index(tiny_model_dir: Path, root: Path) -> int:
    run_config = _run_config(tiny_model_dir)
    runtime = runtime_for(
        run_config, _node_configs(root, tiny_model_dir)[0], run_id=99, deployed=True
    )
    layout = fmodel.adapter_layout(runtime.model)
    offset = 0
    for name, size in zip(layout.names, layout.sizes, strict=True):
        if "classifier" in name and name.endswith("bias"):
            return offset
        offset += size
    raise AssertionError(f"no classifier bias in {layout.names}")


@pytest.mark.slow
def test_honest_nodes_are_never_refused_and_stay_within_the_bound(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    globals_, updates, honest = _federate(tiny_model_dir, tmp_path, 5)
    bound = honest.guard.bound
    assert all(ok for _, ok in honest.guard.history)
    moves = [float(np.max(np.abs(b - a))) for a, b in zip(globals_, globals_[1:], strict=False)]
    print(f"bound {bound:.4g}; honest moves {[round(m, 5) for m in moves]}")
    assert max(moves) < bound
    # Every node used every global: its update starts from it (round r+1 from round r).
    for r in range(1, 5):
        for w in updates[r]:
            assert float(np.max(np.abs(w - globals_[r]))) <= bound


@pytest.mark.slow
def test_a_bias_shift_and_a_x50_round_are_refused_with_max_step_factor_0(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    j = _bias_index(tiny_model_dir, tmp_path / "layout")

    def attack(r: int, w: np.ndarray, start: np.ndarray) -> np.ndarray:
        w = w.copy()
        if r == 2:
            w[j] += 10.0  # the +10 shift of one classifier-bias entry
        if r == 4:
            w = start + 50.0 * (w - start)  # the x50 round
        return w

    run: dict[str, Any] = {"max-step-factor": 0}
    globals_, updates, honest = _federate(tiny_model_dir, tmp_path, 5, attack, **run)
    assert abs(globals_[2][j] - globals_[1][j]) > 2.0  # the attack reached the global
    # Round 3: the honest nodes trained from round 1's global, not the shifted one.
    for w in updates[2][1:]:
        assert abs(w[j] - globals_[1][j]) < 0.5
        assert float(np.max(np.abs(w - globals_[1]))) < float(np.max(np.abs(w - globals_[2])))
    # Round 5: from round 3's global, not round 4's scaled one.
    x50 = float(np.max(np.abs(globals_[4] - globals_[3])))
    for w in updates[4][1:]:
        assert float(np.max(np.abs(w - globals_[3]))) < x50 / 2
    assert x50 > honest.guard.bound
    refused = sorted({r for r, ok in honest.guard.history if not ok})
    assert refused == [2, 4]


@pytest.mark.slow
def test_under_example_level_dp_the_bias_shift_is_refused_out_loud(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``dp = "example"``: a global out of bounds is refused with the fixed code only
    (post-processing of DP releases; the blame step needs it), by every node."""
    j = _bias_index(tiny_model_dir, tmp_path / "layout")

    def attack(r: int, w: np.ndarray, start: np.ndarray) -> np.ndarray:
        w = w.copy()
        if r == 2:
            w[j] += 10.0
        return w

    refusals: dict[int, list[str]] = {}
    run: dict[str, Any] = {"max-step-factor": 0, "dp": "example", "noise-multiplier": 2.0}
    globals_, _, honest = _federate(tiny_model_dir, tmp_path, 3, attack, refusals=refusals, **run)
    assert abs(globals_[2][j] - globals_[1][j]) > 2.0  # the attack reached the global
    # Rounds 1 and 2 ran (round 1's global accepted); round 3's messages carry round 2's.
    assert refusals == {3: ["global-refused"] * NODES}
    assert sorted({r for r, ok in honest.guard.history if not ok}) == [2]
    assert honest.guard.last_accepted()[0] == 1
