"""DP-SGD step time / plain step time on the default model, measured in one run.

    python benchmarks/bench_dp.py [--batch-size 16] [--steps 30] [--threads N]

Both optimisers train the same LoRA model (bundled MiniLM-L6, r=8 on query/value,
8-way head) on the same WordNet batches; DP-SGD adds Opacus' per-example gradients
(hooks on the LoRA and head layers only), clipping and the noise of
``fedtune.privacy.noise.CsprngNoise`` (ChaCha20 keystream, sum of four Gaussians), the
default of ``make_dp_training``. All arms step on the same batches (Poisson-sampled,
as DP-SGD draws them; ``--own-loaders`` gives each its own), in interleaved blocks of
five, so batch shapes and machine noise hit them alike. Also printed: the time of one
step's noise draw alone (all trainable values, float64 on the step's device). Goal: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--own-loaders",
        action="store_true",
        help="each arm draws its own batches (plain: fixed size) instead of all sharing "
        "the same Poisson batches; adds batch-shape noise to the ratio",
    )
    args = parser.parse_args()

    import torch

    from fedtune import data as fdata
    from fedtune import model as fmodel
    from fedtune.config import DataConfig, ModelConfig
    from fedtune.data.collate import pad_collate
    from fedtune.privacy.dpsgd import make_dp_training
    from fedtune.privacy.noise import CsprngNoise
    from fedtune.tasks.classification import EncodedDataset
    from fedtune.train import make_loader, select_device

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = select_device("auto")
    data = fdata.load_data(DataConfig(examples_per_label=100), seed=0)
    cfg = ModelConfig()
    tokenizer = fmodel.load_tokenizer(cfg)
    train = EncodedDataset(tokenizer, data.texts, data.labels, max_length=48)

    def plain_setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
        model = fmodel.build_model(cfg, num_labels=8, seed=0).to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loader = make_loader(
            train,
            batch_size=args.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        return model, opt, loader

    def dp_setup(csprng: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
        model = fmodel.build_model(cfg, num_labels=8, seed=0).to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        # csprng=False: Opacus' own torch.normal noise, the baseline the CSPRNG replaces
        noise_kw = (
            {"noise": CsprngNoise()}
            if csprng
            else {"noise_generator": torch.Generator().manual_seed(1)}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the noise_generator path
            dp = make_dp_training(
                module=model,
                optimizer=opt,
                data=train,
                expected_batch_size=args.batch_size,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                generator=torch.Generator().manual_seed(0),
                collate_fn=pad_collate(train.pad_id),
                **noise_kw,  # type: ignore[arg-type]
            )
        return dp.module, dp.optimizer, dp.data_loader

    def draw(loader: object, n: int) -> list[dict[str, torch.Tensor]]:
        """``n`` non-empty batches of ``loader`` (cycling), on the device."""
        out: list[dict[str, torch.Tensor]] = []
        while len(out) < n:
            for raw in loader:  # type: ignore[attr-defined]
                if len(raw["labels"]) and len(out) < n:
                    out.append({k: v.to(device) for k, v in raw.items()})
        return out

    def timed_steps(
        setup: tuple[torch.nn.Module, torch.optim.Optimizer, object],
        batches: list[dict[str, torch.Tensor]],
    ) -> list[float]:
        model, opt, _ = setup
        times: list[float] = []
        for batch in batches:
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times

    plain, dp, opacus = plain_setup(), dp_setup(), dp_setup(csprng=False)
    block = 5
    steps = max(block, args.steps // block * block)
    # Every arm trains on the same batches: Poisson ones (mean batch-size), as DP-SGD
    # draws them, unless --own-loaders gives each arm its own loader (plain: fixed size).
    if args.own_loaders:
        feeds = [draw(arm[2], steps + 3) for arm in (plain, dp, opacus)]
    else:
        feeds = [draw(dp[2], steps + 3)] * 3
    for arm, feed in zip((plain, dp, opacus), feeds, strict=True):
        timed_steps(arm, feed[:3])  # warm-up
    plain_t: list[float] = []
    dp_t: list[float] = []
    opacus_t: list[float] = []
    for lo in range(3, steps + 3, block):
        plain_t += timed_steps(plain, feeds[0][lo : lo + block])
        dp_t += timed_steps(dp, feeds[1][lo : lo + block])
        opacus_t += timed_steps(opacus, feeds[2][lo : lo + block])
    p_med, d_med = statistics.median(plain_t), statistics.median(dp_t)
    o_med = statistics.median(opacus_t)
    trainable = sum(p.numel() for p in plain[0].parameters() if p.requires_grad)
    source = CsprngNoise()
    noise_t: list[float] = []
    for _ in range(20):
        start = time.perf_counter()
        source.normal((trainable,), 1.0, device=device, dtype=torch.float64)
        if device.type == "cuda":
            torch.cuda.synchronize()
        noise_t.append(time.perf_counter() - start)
    n_med = statistics.median(noise_t[2:])
    feed = (
        "each arm on its own loader (plain: fixed size)"
        if args.own_loaders
        else "all arms on the same Poisson batches"
    )
    print(
        f"device {device}, threads {args.threads}, batch size {args.batch_size} "
        f"(Poisson, mean {args.batch_size}); {feed}"
    )
    print(f"trainable parameters {trainable}")
    print(f"plain step  median {p_med * 1e3:7.1f} ms over {len(plain_t)} steps")
    print(f"DP-SGD step median {d_med * 1e3:7.1f} ms over {len(dp_t)} steps (CsprngNoise)")
    print(f"DP-SGD step median {o_med * 1e3:7.1f} ms over {len(opacus_t)} steps (Opacus noise)")
    print(
        f"noise draw  median {n_med * 1e3:7.2f} ms for {trainable} values "
        f"({trainable / n_med / 1e6:.1f} M values/s, CsprngNoise)"
    )
    print(f"DP / plain step time: {d_med / p_med:.3f}  (goal <= 1.10)")
    print(f"CSPRNG DP / Opacus-noise DP step time: {d_med / o_med:.3f}")


if __name__ == "__main__":
    main()
