"""How much of a DPO gradient is shared between pairs, for each WordNet pairing rule.

    python benchmarks/bench_pref_gradients.py [--pairs 16] [--set lora-layers=]

DP-SGD adds noise of the same size to every step, so it learns what the clipped
per-pair gradients have *in common*: their mean over a batch of B pairs keeps that
shared part, while each pair's own part shrinks like 1/sqrt(B). This script takes
``--pairs`` training pairs of ``simulations/preference.toml`` (the model and adapter
as configured: SmolLM2-135M-Instruct, FFA-LoRA r=4 on q_proj/v_proj of the top 8
blocks, β = 0.1; ``--set lora-layers=`` for every block) for
each ``preference-pairs`` rule, computes every pair's DPO gradient at the start of
training with Opacus' per-sample gradients, and prints the median gradient norm and
the mean cosine between two pairs' gradients. A mean cosine c means the shared part
is about sqrt(c) of each gradient.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=16, help="pairs per rule (one batch)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    args = parser.parse_args()

    import torch
    from opacus import GradSampleModule

    from fedtune import model as fmodel
    from fedtune.config import load_toml, parse_run_config
    from fedtune.tasks import get_task
    from fedtune.tasks.preference.loss import dpo_loss

    warnings.filterwarnings("ignore")
    flat = {**load_toml(ROOT / "simulations" / "preference.toml"), "dp": "off"}
    for item in args.set:
        key, _, value = item.partition("=")
        flat[key] = type(flat[key])(value) if key in flat else value
    for rule in ("sibling", "usage-example"):
        cfg = parse_run_config({**flat, "preference-pairs": rule})
        tokenizer = fmodel.load_tokenizer(cfg.model)
        sets = get_task("preference").client_datasets(
            cfg, tokenizer, partition_id=0, num_partitions=1
        )
        train = sets.train_set
        n = min(args.pairs, len(train))
        batch = train.collate_fn()([train[i] for i in range(n)])  # type: ignore[attr-defined]
        model = GradSampleModule(fmodel.build_model(cfg.model, num_labels=0, seed=0))
        dpo_loss(model, batch, beta=cfg.train.beta).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.cat([p.grad_sample.reshape(n, -1) for p in params], 1).double()
        norms = grads.norm(dim=1)
        unit = grads / norms[:, None]
        mean_cos = float(((unit @ unit.T).sum() - n) / (n * (n - 1)))
        print(
            f"preference-pairs = {rule!r}: {n} pairs, {grads.shape[1]} trained parameters, "
            f"median gradient norm {float(norms.median()):.3f}, mean pairwise cosine "
            f"{mean_cos:.4f} (shared part about {max(mean_cos, 0.0) ** 0.5:.3f} of a gradient)",
            flush=True,
        )


if __name__ == "__main__":
    main()
