"""The movement bound from the config (fedtune/movement.py) and its signed guard (guard.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune import movement
from fedtune.config import parse_run_config
from fedtune.errors import GuardKeyError
from fedtune.guard import MovementGuard, load_key


@pytest.mark.parametrize("seed", range(6))
def test_torchs_adam_never_steps_past_the_ratio_bound(seed: int) -> None:
    # Adversarial-looking gradients: magnitudes growing or shrinking geometrically,
    # random signs and zeros; each step of torch's AdamW must stay within lr * R_t.
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
    lr = 0.01
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
    growth = 1.0 + 3.0 * torch.rand(64, generator=gen, dtype=torch.float64)
    worst = 0.0
    for t in range(1, 41):
        before = p.detach().clone()
        sign = torch.where(torch.rand(64, generator=gen) < 0.8, 1.0, -1.0).double()
        p.grad = sign * growth**t * (torch.rand(64, generator=gen) > 0.1).double()
        opt.step()
        step = float((p.detach() - before).abs().max())
        assert step <= lr * movement.adam_ratio_bound(t) * (1 + 1e-9)
        worst = max(worst, step / (lr * movement.adam_ratio_bound(t)))
    assert worst > 0.5  # the bound is not vacuous for these gradients


def test_dpsgd_bound_by_hand() -> None:
    # No noise, no momentum, certain sampling (q = 1, n = B = 4, T = 2): each step's
    # gradient is at most 4 C / 4 = C per coordinate, so the round moves <= 2 lr C.
    bound = movement.dpsgd_round_bound(
        learning_rate=0.5,
        momentum=0.0,
        weight_decay=0.0,
        steps=2,
        sample_rate=1.0,
        num_examples=4,
        batch_size=4,
        clip=1.0,
        noise_multiplier=0.0,
        dimension=10,
    )
    assert bound == pytest.approx(2 * 0.5 * 1.0)
    # Momentum 0.9 can multiply it by at most 1 / (1 - 0.9) = 10.
    assert movement.sgd_momentum_factor(0.9) == pytest.approx(10.0)


def test_round_bounds_of_the_configs(tiny_model_dir: Path) -> None:
    quick = parse_run_config({"learning-rate": 0.002, "batch-size": 16})
    # 400 examples / 16 = 25 Adam steps: lr * sum_{t<=25} R_t = 0.002 * 27.17.
    assert movement.round_bound(quick, num_examples=400, plan=None, dimension=10) == (
        pytest.approx(0.002 * 27.168, rel=1e-4)
    )
    plain_sgd = parse_run_config({"optimizer": "sgd"})
    assert movement.round_bound(plain_sgd, num_examples=400, plan=None, dimension=10) == math.inf


def _guard(tmp_path: Path, initial: np.ndarray, bound: float = 0.1) -> MovementGuard:
    return MovementGuard(
        bound=bound,
        initial=initial,
        max_rounds=10,
        path=tmp_path / "movement-guard.bin",
        key_path=tmp_path / "guard.key",
        run="run-a/abc",
    )


def test_guard_refuses_from_round_one_and_keeps_the_last_accepted(tmp_path: Path) -> None:
    initial = np.zeros(5)
    guard = _guard(tmp_path, initial)
    shifted = initial.copy()
    shifted[3] = 10.0 / 4  # one client of four adds +10 to a bias entry
    np.testing.assert_array_equal(guard.accept(shifted, server_round=1), initial)
    honest = initial + 0.05
    np.testing.assert_array_equal(guard.accept(honest, server_round=1), honest)
    # Seen again in the next message: the same global of the same round is accepted,
    # another one for that round is not.
    np.testing.assert_array_equal(guard.accept(honest, server_round=1), honest)
    np.testing.assert_array_equal(guard.accept(honest + 0.01, server_round=1), honest)
    # Two rounds later: twice the allowance, from the last accepted global.
    np.testing.assert_array_equal(guard.accept(honest + 0.19, server_round=3), honest + 0.19)
    assert [ok for _, ok in guard.history] == [False, True, True, False, True]
    assert oct((tmp_path / "guard.key").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "movement-guard.bin").stat().st_mode & 0o777) == "0o600"


def test_a_new_process_remembers_and_a_forged_state_resets_nothing(tmp_path: Path) -> None:
    initial = np.zeros(5)
    first = _guard(tmp_path, initial)
    g1 = initial + 0.1
    g2 = g1 + 0.1
    first.accept(g1, server_round=1)
    first.accept(g2, server_round=2)
    # A fresh guard (a new ClientApp process) reads the signed state: round 2, g2.
    assert _guard(tmp_path, initial).last_accepted()[0] == 2
    # An attacker who can write the state file but not read the key writes its own
    # state (round 9, a far global): the tag fails, the previous signed state is used.
    import io

    buffer = io.BytesIO()
    np.savez(buffer, round=np.array(9), vector=initial + 50.0)
    (tmp_path / "movement-guard.bin").write_bytes(b"\0" * 32 + buffer.getvalue())
    last_round, last = _guard(tmp_path, initial).last_accepted()
    assert last_round == 1
    np.testing.assert_array_equal(last, g1)
    # Both files garbage: round 0 and the initial adapter, never "accept anything".
    (tmp_path / "movement-guard.bin.previous").write_bytes(b"PK\x03\x04 not a zip")
    fresh = _guard(tmp_path, initial)
    assert fresh.last_accepted()[0] == 0
    np.testing.assert_array_equal(fresh.accept(initial + 30.0, server_round=5), initial)


def test_another_run_starts_from_the_initial_adapter(tmp_path: Path) -> None:
    initial = np.zeros(3)
    _guard(tmp_path, initial).accept(initial + 0.1, server_round=1)
    other = MovementGuard(
        bound=0.1,
        initial=initial,
        max_rounds=10,
        path=tmp_path / "movement-guard.bin",
        key_path=tmp_path / "guard.key",
        run="run-b/abc",
    )
    assert other.last_accepted()[0] == 0


def test_a_bad_key_file_is_named(tmp_path: Path) -> None:
    key = tmp_path / "guard.key"
    key.write_bytes(b"short")
    key.chmod(0o600)
    with pytest.raises(GuardKeyError, match="guard key .*guard.key' is not a 32-byte regular"):
        load_key(key)
    with pytest.raises(ValueError, match="movement bound must be > 0, got 0"):
        MovementGuard(bound=0.0, initial=np.zeros(2), max_rounds=1)
    key.write_bytes(bytes(32))
    key.chmod(0o644)
    with pytest.raises(GuardKeyError, match=r"open to other users \(mode 0644\).*chmod 600"):
        load_key(key)
    link = tmp_path / "link.key"
    link.symlink_to(key)
    with pytest.raises(GuardKeyError, match="cannot be opened"):
        load_key(link)
