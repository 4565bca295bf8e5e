"""Virtual steps: a large Poisson batch split by length is the same DP-SGD step.

An attack on the accounting would be a split that takes more than one step per
logical batch (the ledger counts one), adds the noise once per part (more noise
than claimed is harmless, less is not: a part-wise noise divided by the part size
would be), or lets a canary in once per part. Each is a test below.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("opacus")

from conftest import tiny_lora_bert  # noqa: E402
from torch import nn  # noqa: E402

from fedtune.config import TrainConfig  # noqa: E402
from fedtune.data.collate import pad_collate  # noqa: E402
from fedtune.privacy.dpsgd import make_dp_training  # noqa: E402
from fedtune.privacy.noise import SeededNoise  # noqa: E402
from fedtune.privacy.virtual import LengthSortedSplitter  # noqa: E402
from fedtune.train.loop import make_loader, train_local  # noqa: E402

VOCAB, MAX_LEN, MARK = 60, 14, 5


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Ragged:
    """Unpadded sequences of 2..MAX_LEN tokens; label 1 iff MARK occurs."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(n):
            length = int(torch.randint(2, MAX_LEN + 1, (1,), generator=g))
            ids = torch.randint(6, VOCAB, (length,), generator=g)
            label = int(torch.randint(0, 2, (1,), generator=g))
            if label:
                ids[int(torch.randint(1, length, (1,), generator=g))] = MARK
            ids[0] = 2
            self.rows.append((ids, torch.tensor(label)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, label = self.rows[i]
        return {"input_ids": ids, "labels": label}

    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.rows]

    def collate_fn(self):  # type: ignore[no-untyped-def]
        return pad_collate(0)


def _tiny_lora_bert() -> nn.Module:
    return tiny_lora_bert(vocab_size=VOCAB, max_len=MAX_LEN, rank=4)


def _one_dp_epoch(physical: int, *, rows_seen: list[int] | None = None):  # type: ignore[no-untyped-def]
    model = _tiny_lora_bert()
    model.train()
    if rows_seen is not None:
        model.register_forward_pre_hook(
            lambda _m, _a, kw: rows_seen.append(len(kw["input_ids"])), with_kwargs=True
        )
    data = _Ragged(256, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    dp = make_dp_training(
        module=model,
        optimizer=torch.optim.SGD(params, lr=0.5, momentum=0.9),
        data=data,
        expected_batch_size=64,
        noise_multiplier=0.7,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(3),
        noise=SeededNoise(3),  # a test: reproducible noise (never on real data)
        collate_fn=data.collate_fn(),
        physical_batch_size=physical,
    )
    cfg = TrainConfig(local_epochs=2, optimizer="sgd", learning_rate=0.5)
    result = train_local(
        dp.module,
        dp.data_loader,
        cfg,
        device=torch.device("cpu"),
        optimizer=dp.optimizer,
        private=True,
    )
    dp.close()
    vector = torch.cat([p.detach().flatten() for p in params]).numpy().astype(np.float64)
    return result, vector, dp


def test_a_split_batch_is_the_same_step_counted_once() -> None:
    whole, w_whole, dp = _one_dp_epoch(0)
    rows: list[int] = []
    split, w_split, _ = _one_dp_epoch(16, rows_seen=rows)
    assert whole.steps == split.steps == 2 * dp.steps_per_epoch == 8  # one step per Poisson batch
    assert whole.num_examples == split.num_examples  # the same Poisson batches
    assert max(rows) <= 16 and len(rows) > split.steps  # really split, never over 16 rows
    assert np.abs(w_split - w_whole).max() < 1e-5  # the same clipped sum and noise
    assert np.abs(w_whole - _one_dp_epoch(0)[1]).max() == 0.0  # reproducible, so it means it
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)


class _Recorder:
    def __init__(self) -> None:
        self.signals: list[bool] = []

    def signal_skip_step(self, do_skip: bool = True) -> None:
        self.signals.append(do_skip)


def test_the_splitter_sorts_by_length_and_ends_each_batch_with_a_step() -> None:
    lengths = [9, 3, 7, 1, 8, 2, 6, 4, 5, 10]
    recorder = _Recorder()
    splitter = LengthSortedSplitter(
        sampler=[list(range(10)), [4, 1], []],
        max_batch_size=4,
        optimizer=recorder,
        lengths=lengths,
    )
    chunks = list(splitter)
    by_length = sorted(range(10), key=lengths.__getitem__)
    assert chunks[:3] == [by_length[0:4], by_length[4:8], by_length[8:]]
    assert chunks[3:] == [[4, 1], []]  # small batches pass unchanged; empty ones still step
    assert recorder.signals == [True, True, False, False, False]
    assert len(splitter) == 3
    with pytest.raises(ValueError, match="max_batch_size"):
        LengthSortedSplitter(sampler=[], max_batch_size=0, optimizer=recorder, lengths=None)


def test_canaries_join_a_split_batch_once() -> None:
    from torch.utils.data import TensorDataset

    from fedtune.privacy.canaries import CanaryState

    state = CanaryState.create(m=6, num_coords=12, clip_norm=2.0, seed=1)
    model = nn.Sequential(nn.Linear(3, 3))
    data = TensorDataset(torch.randn(4, 3), torch.zeros(4))
    dp = make_dp_training(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data=data,
        expected_batch_size=4,  # q = 1: every slot drawn, the batch is all four rows
        noise_multiplier=1e-9,
        max_grad_norm=2.0,
        generator=torch.Generator().manual_seed(0),
        noise=SeededNoise(0),
        canaries=state.step_source(1),
        physical_batch_size=1,  # four parts
    )
    parts = 0
    for x, _ in dp.data_loader:
        dp.optimizer.zero_grad()
        (dp.module(x) * 0.0).sum().backward()
        dp.optimizer.step()
        parts += 1
        if not dp.optimizer._is_last_step_skipped:  # type: ignore[attr-defined]
            break
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]).numpy()
    dp.close()
    assert parts == 4
    expected = np.zeros(12)
    expected[state.coords[state.included]] = -2.0 / 4  # once, not once per part
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_held_out_batches_by_length_keep_every_item_once() -> None:
    data = _Ragged(50, seed=4)
    loader = make_loader(data, batch_size=8, shuffle=False, by_length=True)
    widths, labels = [], []
    for batch in loader:
        widths.append(int(batch["attention_mask"].sum(1).max()))
        labels.extend(batch["labels"].tolist())
    assert widths == sorted(widths)
    assert sorted(labels) == sorted(int(label) for _, label in data.rows)
    assert len(labels) == 50
