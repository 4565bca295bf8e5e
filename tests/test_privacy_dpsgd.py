"""DP-SGD wiring on a tiny LoRA-wrapped BERT, incl. the Opacus #820 regression.

Opacus issue #820: DP + LoRA trained "normally" (loss down, ε up) yet produced unusable
models. The test below checks the three things that would reveal it: the model learns
(held-out accuracy well above chance), the trainable LoRA/head tensors move, and every
frozen base tensor is bit-for-bit unchanged.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("opacus")

from conftest import tiny_lora_bert  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from fedtune.errors import UnsupportedLayerError  # noqa: E402
from fedtune.privacy.dpsgd import check_dp_compatible, make_dp_training, unwrap  # noqa: E402
from fedtune.privacy.noise import SeededNoise  # noqa: E402

VOCAB, SEQ, MARK = 100, 12, 5


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny matmuls: intra-op threads only add sync cost, and on a busy 2-core box they
    oversubscribe badly (measured: the training test took 115 s with the default threads
    under load 3, 2.6 s with one thread under load 6)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_lora_bert(seed: int = 0) -> nn.Module:
    return tiny_lora_bert(vocab_size=VOCAB, max_len=SEQ, seed=seed)


def _toy_data(n: int, seed: int) -> TensorDataset:
    """label = 1 iff token MARK occurs; half of the sequences get it planted."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (n, SEQ), generator=g)  # tokens 0-5 never occur by chance
    labels = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(1, SEQ, (n,), generator=g)
    ids[labels == 1, pos[labels == 1]] = MARK
    ids[:, 0] = 2  # a fixed "CLS"
    return TensorDataset(ids, labels)


def _accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    ids, labels = data.tensors
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    model.train()
    return (pred == labels).float().mean().item()


def test_dp_lora_learns_and_leaves_frozen_weights_untouched() -> None:
    model = _tiny_lora_bert()
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable

    train, test = _toy_data(1024, seed=1), _toy_data(512, seed=2)
    acc_before = _accuracy(model, test)
    # SGD + momentum: with σ=0.5 the per-coordinate noise swamps Adam's normalisation
    # (measured: Adam at lr 5e-3..2e-2 stays at chance for 6 epochs; this learns).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    dp = make_dp_training(
        module=model,
        optimizer=optimizer,
        data=train,
        expected_batch_size=64,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(3),
        noise=SeededNoise(3),  # a test: reproducible noise (never on real data)
    )
    assert dp.sample_rate == pytest.approx(64 / 1024)
    assert dp.steps_per_epoch == 16
    steps = 0
    for _epoch in range(10):
        for ids, labels in dp.data_loader:
            dp.optimizer.zero_grad()
            loss = dp.module(input_ids=ids, labels=labels).loss
            loss.backward()
            dp.optimizer.step()
            steps += 1
    assert steps == 10 * dp.steps_per_epoch
    base = dp.close()
    assert base is model

    acc = _accuracy(model, test)
    assert acc > 0.8, f"DP-LoRA did not learn the toy task: accuracy {acc_before:.2f} -> {acc:.2f}"
    for name, before in frozen.items():
        assert torch.equal(before, dict(model.named_parameters())[name]), f"frozen {name} changed"
    moved = [
        n
        for n, before in trainable.items()
        if not torch.equal(before, dict(model.named_parameters())[n])
    ]
    assert sorted(moved) == sorted(trainable), "some trainable tensors never moved"
    # close() removed every Opacus trace, so the next round can wrap the same model again
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_rewrap_after_close_and_no_hooks_left() -> None:
    model = _tiny_lora_bert()
    model.train()
    data = _toy_data(64, seed=4)
    for _round in range(2):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        dp = make_dp_training(
            module=model,
            optimizer=optimizer,
            data=data,
            expected_batch_size=16,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(_round),
        )
        ids, labels = next(iter(dp.data_loader))
        dp.optimizer.zero_grad()
        dp.module(input_ids=ids, labels=labels).loss.backward()
        dp.optimizer.step()
        dp.close()
    # after close, a plain backward leaves no per-sample gradients behind
    model(input_ids=data.tensors[0][:4], labels=data.tensors[1][:4]).loss.backward()
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


def test_wrapping_twice_is_refused() -> None:
    model = _tiny_lora_bert()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    kw = dict(data=_toy_data(32, 0), expected_batch_size=8, noise_multiplier=1.0, max_grad_norm=1.0)
    dp = make_dp_training(module=model, optimizer=opt, generator=torch.Generator(), **kw)
    with pytest.raises(UnsupportedLayerError, match="already carries Opacus hooks"):
        make_dp_training(module=model, optimizer=opt, generator=torch.Generator(), **kw)
    with pytest.raises(UnsupportedLayerError, match="already carries Opacus hooks"):
        make_dp_training(module=dp.module, optimizer=opt, generator=torch.Generator(), **kw)
    assert unwrap(dp.module) is model


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_unsupported_trainable_layer_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _Scale())
    with pytest.raises(UnsupportedLayerError, match=r"`1` \(_Scale\).*requires_grad_\(False\)"):
        check_dp_compatible(model)
    assert check_dp_compatible(model, allow_functorch=True) == ["0", "1"]
    model[1].gain.requires_grad_(False)  # frozen: fine
    assert check_dp_compatible(model) == ["0"]


def test_batchnorm_and_optimizer_mismatches_are_refused() -> None:
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    bn[1].requires_grad_(False)
    with pytest.raises(UnsupportedLayerError, match=r"`1` \(BatchNorm1d\).*batch statistics"):
        check_dp_compatible(bn)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    stale = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(UnsupportedLayerError, match="not parameters of the model"):
        check_dp_compatible(model, stale)
    partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(UnsupportedLayerError, match=r"missing from the optimizer: \['1.bias'"):
        check_dp_compatible(model, partial)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(UnsupportedLayerError, match="no trainable parameters"):
        check_dp_compatible(frozen)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, r"`noise_multiplier` must be finite and > 0, got 0.0"),
        ({"max_grad_norm": -1.0}, r"`max_grad_norm` must be finite and > 0, got -1.0"),
        ({"expected_batch_size": 0}, r"`expected_batch_size` must be an integer >= 1, got 0"),
        (
            {"expected_batch_size": 999},
            r"`expected_batch_size` \(999\) exceeds the dataset size \(32\)",
        ),
        ({"generator": 7}, r"`generator` must be a torch.Generator, got int"),
    ],
)
def test_bad_dp_inputs(kwargs: dict, match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    base = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data=TensorDataset(torch.zeros(32, 4), torch.zeros(32, dtype=torch.long)),
        expected_batch_size=8,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        generator=torch.Generator(),
    )
    with pytest.raises(ValueError, match=match):
        make_dp_training(**{**base, **kwargs})


def test_eval_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    with pytest.raises(UnsupportedLayerError, match="eval mode"):
        make_dp_training(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data=TensorDataset(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)),
            expected_batch_size=2,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            generator=torch.Generator(),
        )


# --- DP-SGD on an exact grid (issue 26 part F: fedtune/privacy/optimizer.py) ---------


def _grid_step_grads(
    seed: int,
    *,
    sigma: float = 1.0,
    clip: float = 1.0,
    zero: bool = False,
    replace_row: bool = False,
    grid: bool = True,
) -> tuple[torch.Tensor, object]:
    """One DP-SGD step of a 4->3 linear layer (d = 15) on 8 rows, q = 1/2, batch 4; the
    gradient after Opacus' division by the expected batch size, and the step's grid."""
    import torch.nn.functional as F

    from fedtune.privacy.optimizer import dpsgd_grid

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    data = TensorDataset(torch.randn(8, 4) * 5, torch.randint(0, 3, (8,)))
    if replace_row:  # a replace-one neighbour: every row of the data set is replaced
        data = TensorDataset(data.tensors[0] * -0.37 + 1.1, data.tensors[1])
    dp = make_dp_training(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data=data,
        expected_batch_size=4,  # a power of two: the division is exact
        noise_multiplier=sigma,
        max_grad_norm=clip,
        generator=torch.Generator().manual_seed(1),
        noise=SeededNoise(seed),
        grid=grid,
    )
    for x, y in dp.data_loader:
        dp.optimizer.zero_grad()
        loss = F.cross_entropy(dp.module(x), y) * (0.0 if zero else 1.0)
        loss.backward()
        dp.optimizer.step()
        break
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    spec = dpsgd_grid(clip_norm=clip, noise_multiplier=sigma, dim=15)
    dp.close()
    return grad, spec


def test_dpsgd_releases_the_noisy_sum_on_the_grid() -> None:
    """Every released value is an exact multiple of g before the division (fails with
    float noise added to the float sum: the old add_noise)."""
    grad, spec = _grid_step_grads(3)
    released = grad * 4 / spec.grid  # type: ignore[attr-defined]
    assert torch.equal(released, torch.round(released))
    assert spec.grid == 2.0 ** round(math.log2(spec.grid))  # type: ignore[attr-defined]
    assert released.abs().max() > 0


def test_neighbouring_inputs_release_on_the_same_lattice() -> None:
    """The grid does not depend on the data: two different data sets' releases are
    both exact multiples of the same ``g`` (bitwise: ``x / g`` is an integer in float64,
    and ``g`` times it gives ``x`` back exactly), so their low-order bits carry nothing."""
    a, spec_a = _grid_step_grads(3)
    b, spec_b = _grid_step_grads(3, replace_row=True)
    assert spec_a == spec_b
    for grad in (a, b):
        ints = grad * 4 / spec_a.grid  # type: ignore[attr-defined]
        assert torch.equal(ints, torch.round(ints))
        assert torch.equal(ints * spec_a.grid / 4, grad)  # type: ignore[attr-defined]
    assert not torch.equal(a, b)


def test_float_noise_path_is_kept_behind_dp_noise_float() -> None:
    """``grid=False`` (``dp-noise = "float"``): float64 Gaussian noise, off the grid."""
    grad, spec = _grid_step_grads(3, grid=False)
    released = grad * 4 / spec.grid  # type: ignore[attr-defined]
    assert not torch.equal(released, torch.round(released))


def test_dpsgd_grid_noise_is_reproducible_from_the_seed() -> None:
    assert torch.equal(_grid_step_grads(5)[0], _grid_step_grads(5)[0])
    assert not torch.equal(_grid_step_grads(5)[0], _grid_step_grads(6)[0])


@pytest.mark.parametrize(
    ("clip", "sigma", "dim"),
    [(1.0, 1.0, 15), (0.1, 0.6, 76_808), (3.0, 1.3, 1_000_000), (1.0, 20.0, 76_808)],
)
def test_dpsgd_grid_noise_multiplier_is_at_least_sigma(clip: float, sigma: float, dim: int) -> None:
    """``s / R >= σ`` for the rounded rows' bound ``R = C / g + sqrt(d) / 2`` (and at most
    2^-20 above: s^2 is rounded up, not inflated)."""
    from fedtune.privacy.optimizer import MAX_INFLATION, dpsgd_grid

    spec = dpsgd_grid(clip_norm=clip, noise_multiplier=sigma, dim=dim)
    g, row = spec.grid, spec.row_bound
    assert row >= clip / g + math.sqrt(dim) / 2
    assert math.sqrt(spec.sigma2) / row >= sigma
    assert sigma <= spec.effective_noise_multiplier < sigma * (1 + 2.0**-20)
    assert 1 < row * g / clip <= MAX_INFLATION


def test_dpsgd_grid_noise_has_scale_s() -> None:
    """Zero gradients: the released integers are the noise, of std ``s`` (not ``σ C / g``)."""
    stats = pytest.importorskip("scipy.stats")
    samples = []
    for seed in range(40):
        grad, spec = _grid_step_grads(100 + seed, zero=True)
        samples.append(grad * 4 / spec.grid)  # type: ignore[attr-defined]
    z = torch.cat(samples).numpy() / math.sqrt(spec.sigma2)  # type: ignore[attr-defined]
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * len(z))
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_dpsgd_refuses_rows_beyond_the_accounted_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.privacy.optimizer import sourced_dp_optimizer

    cls = sourced_dp_optimizer()
    monkeypatch.setattr(cls, "_clip_factors", lambda self, norms: torch.ones_like(norms))
    with pytest.raises(RuntimeError, match=r"> the accounted bound R = .*clipping is broken"):
        _grid_step_grads(3, clip=0.01)


def test_dpsgd_grid_that_cannot_fit_is_refused() -> None:
    from fedtune.privacy.optimizer import dpsgd_grid

    with pytest.raises(ValueError, match=r"noise_multiplier = 100.0 with 10000000 trainable"):
        dpsgd_grid(clip_norm=1.0, noise_multiplier=100.0, dim=10_000_000)


def test_dpsgd_noise_must_be_a_keystream() -> None:
    from fedtune.privacy.optimizer import sourced_dp_optimizer

    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"`noise` must be a ChaChaNoise .* got 'gauss'"):
        sourced_dp_optimizer()(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise="gauss",
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
        )
