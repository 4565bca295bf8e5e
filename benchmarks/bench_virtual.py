"""DP-SGD with large Poisson batches: one padded pass against length-sorted parts.

    python benchmarks/bench_virtual.py [--batch-size 512] [--steps 6] [--physical 128]

The silo recipe (``simulations/silos-private.toml``) draws Poisson batches of 512
expected rows from a silo of 9,799 WordNet definitions. Two arms train the same
LoRA model (bundled MiniLM-L6, FFA-LoRA r=8 on query/value, 8-way head) with DP-SGD
at the same σ, on the same Poisson batches (same sampling seed), in alternating
rounds of ``--steps`` steps: ``physical-batch-size = 0`` (each batch is one
forward/backward pass, padded to its longest row) and ``--physical`` (each batch is
sorted by length and split, :mod:`fedtune.privacy.virtual`). Printed: seconds per
DP-SGD step, real tokens / padded tokens of the passes, and the ratio. Both arms
take the same steps (the same clipped sums, one noise draw each), so the model they
reach differs only by float summation order (also printed; dropout is set to 0 here
so that its random masks do not differ between the arms).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two arms")
    parser.add_argument("--physical", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import numpy as np
    import torch

    from fedtune import data as fdata
    from fedtune import model as fmodel
    from fedtune.config import DataConfig, ModelConfig
    from fedtune.privacy.dpsgd import make_dp_training
    from fedtune.privacy.noise import SeededNoise
    from fedtune.tasks.classification import EncodedDataset

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    data = fdata.load_data(DataConfig(examples_per_label=0), seed=0)
    keep = np.random.default_rng(0).permutation(len(data.labels))[:9799]
    cfg = ModelConfig(lora_variant="ffa")
    tokenizer = fmodel.load_tokenizer(cfg)
    train = EncodedDataset(
        tokenizer, [data.texts[i] for i in keep], [data.labels[i] for i in keep], max_length=48
    )
    model = fmodel.build_model(cfg, num_labels=len(data.label_names), seed=0)
    model.train()
    for module in model.modules():  # dropout draws would differ between the arms
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    start = fmodel.get_adapter_vector(model)
    padded = {0: [0, 0], args.physical: [0, 0]}  # arm -> [real tokens, padded tokens]

    def arm(physical: int, seed: int) -> tuple[float, np.ndarray]:
        fmodel.set_adapter_vector(model, start)
        params = [p for p in model.parameters() if p.requires_grad]
        dp = make_dp_training(
            module=model,
            optimizer=torch.optim.SGD(params, lr=2.0, momentum=0.9),
            data=train,  # type: ignore[arg-type]  # a map-style Dataset
            expected_batch_size=args.batch_size,
            noise_multiplier=0.7,
            max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(seed),
            noise=SeededNoise(seed),  # a benchmark: the same noise in both arms
            collate_fn=train.collate_fn(),
            physical_batch_size=physical,
        )
        steps, begin = 0, time.perf_counter()
        for batch in dp.data_loader:
            dp.optimizer.zero_grad(set_to_none=True)
            dp.module(**batch).loss.backward()
            dp.optimizer.step()
            padded[physical][0] += int(batch["attention_mask"].sum())
            padded[physical][1] += batch["attention_mask"].numel()
            steps += 0 if dp.optimizer._is_last_step_skipped else 1  # type: ignore[attr-defined]
            if steps == args.steps:
                break
        seconds = (time.perf_counter() - begin) / steps
        dp.close()
        return seconds, fmodel.get_adapter_vector(model)

    arm(args.physical, 99)  # warm-up: allocator, first-call costs
    times: dict[int, list[float]] = {0: [], args.physical: []}
    for r in range(args.rounds):
        (t0, w0), (t1, w1) = arm(0, r), arm(args.physical, r)
        times[0].append(t0)
        times[args.physical].append(t1)
        print(
            f"round {r}: one pass {t0:.2f} s/step, split {t1:.2f} s/step, "
            f"max |Δw| {np.abs(w0 - w1).max():.2e}",
            flush=True,
        )
    whole, split = sum(times[0]) / args.rounds, sum(times[args.physical]) / args.rounds
    for physical, (real, total) in padded.items():
        print(f"physical-batch-size {physical}: real/padded tokens {real / total:.3f}")
    print(
        f"batch {args.batch_size}: one pass {whole:.2f} s/step, parts of <= {args.physical} "
        f"sorted by length {split:.2f} s/step: ratio {split / whole:.3f}"
    )


if __name__ == "__main__":
    main()
