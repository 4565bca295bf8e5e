"""What a node needs to train a LoRA adapter at real model sizes: memory, speed, payload.

Run on demand (writes docs/scale.md's table, docs/scale.png and a JSON of the numbers)::

    nice -n 10 python benchmarks/bench_model_scale.py                  # ~1 h on 2 busy cores
    python benchmarks/bench_model_scale.py --sizes 135M --steps 2      # a quick look
    python benchmarks/bench_model_scale.py --sizes 1.1B --modes dp,int8-dp
    python benchmarks/bench_model_scale.py --sizes 1.1B --save-model runs/llama-1.1b-random

Llama-architecture models are built from their configuration with random weights
(nothing is downloaded): ``135M`` has SmolLM2-135M's shape, ``360M`` SmolLM2-360M's,
``1.1B`` TinyLlama-1.1B's. Random weights cost exactly what trained ones do.

Each (size, mode) runs in a fresh subprocess so that its peak resident memory
(``ru_maxrss``) is its own. In it: build the model in float32, quantise the frozen
body if the mode says so (:func:`fedtune.model.quantize.quantize_base`, as a node with
``base-quantization`` does), wrap it with LoRA (r=8, alpha=16 on ``q_proj,v_proj``, as
:func:`fedtune.model.build_model` does), then take ``--steps`` timed SGD steps (after one
untimed warm-up step) on random token ids, ``--batch`` rows of ``--seq-len`` tokens. The
modes:

- ``lora``: plain LoRA; ``int8``: the same on an int8 weight-only base (torchao);
- ``dp``: DP-SGD (:func:`fedtune.privacy.dpsgd.make_dp_training`: Opacus per-example
  gradients of the LoRA tensors, clipping, noise; Poisson batches of mean ``--batch``);
- ``int8-dp``: DP-SGD on the int8 base;
- ``lora-gc`` / ``dp-gc``: with gradient checkpointing (non-reentrant), to see whether
  it lowers the peak and whether it works with Opacus' hooks (the error is recorded);
- ``dp-bf16`` / ``int8-dp-bf16``: DP-SGD under bf16 autocast (``precision = "bf16"``,
  :func:`fedtune.train.loop.compute_precision`), on CUDA or CPU;
- CUDA only (``--device cuda``, scripts/gpu_check.sh): ``nf4`` / ``nf4-dp`` on a 4-bit
  NF4 base (bitsandbytes). On a GPU the memory reported is also
  ``torch.cuda.max_memory_allocated``;
- ``load`` / ``load-int8-post`` / ``load-int8-heap`` / ``load-int8``: only load a saved
  random-weight checkpoint (bfloat16, written once under ``--model-root``) through
  fedtune's loader: float32; float32 then int8 (fedtune before quantising on the fly);
  int8 on the fly with glibc's default malloc thresholds; int8 on the fly as
  ``build_model`` does it (:func:`fedtune.model.quantize.returning_freed_layers`).
  ``--from-disk`` makes the training modes load that way too;
- ``--data wordnet``: the causal-LM task's real WordNet examples (unpadded, padded per
  batch to the longest row by fedtune's collate, answer-only loss) instead of full rows
  of random ids; ``dp-fixpad`` pads every batch to ``--seq-len`` instead.

Tokens per second count the real (unpadded) tokens of the batches actually trained (a
Poisson batch varies). "peak RSS" is the process's ``ru_maxrss`` (it includes file pages
mapped while reading a checkpoint); "peak anon" the largest ``RssAnon`` sampled every 10
ms (:class:`AnonPeak`); "RSS after" is the resident size after the last step (the steady
state of a node that keeps the model between rounds). CKKS cost per round: fedtune's
codec (:class:`fedtune.secure.ckks.CkksCodec`, the default parameters) encrypting one
vector of the adapter's length: bytes on the wire and seconds, measured in the parent
process. ``--check-gc`` also compares Opacus' per-example gradients with and without
checkpointing on a tiny model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Llama shapes, from the models' published config.json files (no weights involved).
SIZES: dict[str, dict[str, Any]] = {
    "135M": {  # HuggingFaceTB/SmolLM2-135M
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
    "360M": {  # HuggingFaceTB/SmolLM2-360M
        "vocab_size": 49152,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "tie_word_embeddings": True,
    },
    "1.1B": {  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    "tiny": {  # a smoke test of the benchmark itself (SmolLM2's vocabulary, 2 small layers)
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}
MODES = (
    "lora",
    "dp",
    "dp-fixpad",
    "int8",
    "int8-dp",
    "lora-gc",
    "dp-gc",
    "nf4",
    "nf4-dp",
    "dp-bf16",
    "int8-dp-bf16",
    "load",
    "load-int8-post",
    "load-int8-heap",
    "load-int8",
)
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def machine() -> str:
    """The machine in words: CPU model, cores, memory, GPU or none."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {cpu} CPU, {mem:.0f} GiB RAM, {gpu}"


def _rss_now() -> int:
    """Resident bytes now (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS shows what is alive.

    Layers under glibc's (dynamic, up to 32 MiB) mmap threshold are freed into the heap
    when the float32 weights are replaced by int8 ones; without a trim the resident size
    keeps them (measured: 360M int8-dp, 2.32 GiB after a step against 2.28 float).
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class AnonPeak:
    """The largest ``RssAnon`` (``/proc/self/status``) seen, sampled every 10 ms.

    ``ru_maxrss`` also counts file pages mapped while safetensors reads a checkpoint
    (clean page cache the kernel can drop under pressure); anonymous memory is what a
    node must really hold. Sampling can miss a peak shorter than 10 ms.
    """

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def wordnet_rows(seq_len: int, n: int, vocab: int) -> tuple[list[dict[str, Any]], int]:
    """``n`` WordNet instruction examples as the causal-LM task tokenises them, and pad id.

    The bundled SmolLM2 tokenizer and chat template, answer-only labels, truncated at
    ``seq_len`` (fedtune.tasks.causal_lm.data): real lengths, unpadded rows. Token ids
    are taken modulo ``vocab`` for a model with a smaller vocabulary (1.1B's 32,000).
    """
    from transformers import AutoTokenizer

    from fedtune.config import DataConfig
    from fedtune.tasks.causal_lm import data as lm_data
    from fedtune.tasks.causal_lm.model import default_causal_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_causal_model_path()))
    data = lm_data.load_instructions(DataConfig(), seed=0)
    ds = lm_data.InstructionDataset(
        tokenizer, data.prompts[:n], data.answers[:n], max_length=seq_len
    )
    rows = [ds[i] for i in range(len(ds))]
    for row in rows:
        row["input_ids"] = row["input_ids"] % vocab
    return rows, ds.pad_id % vocab


def fixed_collate(pad_id: int, width: int):  # type: ignore[no-untyped-def]
    """fedtune's collate, then every batch padded on to ``width`` (the naive fixed shape)."""
    import torch

    from fedtune.data.collate import IGNORE, pad_collate

    inner = pad_collate(pad_id)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        out = inner(items)
        extra = width - out["input_ids"].shape[1]
        if extra > 0 and len(items):
            pad = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
            for key, value in pad.items():
                out[key] = torch.nn.functional.pad(out[key], (0, extra), value=value)
        return out

    return collate


def load_model(model_dir: str, mode: str, device: str) -> Any:
    """Load a saved model the way a node does: fedtune's task loader (+ quantisation)."""
    from fedtune.config import ModelConfig
    from fedtune.model import load_base_model, quantize_base
    from fedtune.model.quantize import returning_freed_layers

    method = "int8" if "int8" in mode else "nf4" if "nf4" in mode else "none"
    cfg = ModelConfig(task="causal-lm", model_path=model_dir, base_quantization=method)  # type: ignore[arg-type]
    if mode == "load-int8-post":  # fedtune before this change: the float32 load, then quantise
        model = load_base_model(cfg, num_labels=0, seed=0)
        quantize_base(model, method, device=device)  # type: ignore[arg-type]
        return model
    if mode == "load-int8-heap":  # quantised while loading, glibc's default malloc thresholds
        model = load_base_model(cfg, num_labels=0, seed=0, quantize=True)
        quantize_base(model, method, device=device)  # type: ignore[arg-type]
        return model
    with returning_freed_layers() if method != "none" else contextlib.nullcontext():
        model = load_base_model(cfg, num_labels=0, seed=0, quantize=True)  # as build_model
        quantize_base(model, method, device=device)  # type: ignore[arg-type]
    return model


def run_one(
    size: str,
    mode: str,
    *,
    seq_len: int,
    batch: int,
    steps: int,
    warmup: int = 1,
    device: str = "cpu",
    model_dir: str = "",
    data: str = "random",
) -> dict[str, Any]:
    """Build, wrap and train one configuration in this process; return its numbers.

    ``model_dir``: load the saved model from there as a node does (:func:`load_model`)
    instead of building it in memory; ``load*`` modes stop after loading.
    ``data = "wordnet"``: real example lengths (:func:`wordnet_rows`), batches padded to
    their longest row (fedtune's collate), or to ``seq_len`` in ``dp-fixpad``.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.model import adapter_layout, quantize_base
    from fedtune.train.loop import compute_precision

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=max(seq_len, 128))
    anon = AnonPeak()
    start = time.perf_counter()
    if model_dir:
        model = load_model(model_dir, mode, device)
        cfg = model.config
        base_params = sum(p.numel() for p in model.parameters())  # int8: numel as float
    else:
        model = LlamaForCausalLM(cfg)
        base_params = sum(p.numel() for p in model.parameters())
        if mode.startswith(("int8", "nf4")):
            quantize_base(model, mode.split("-", 1)[0], device=device)  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    if mode.startswith("load"):
        load_s = time.perf_counter() - start
        _malloc_trim()
        return {
            "size": size,
            "mode": mode,
            "base_params": base_params,
            "build_s": load_s,
            "rss_after_bytes": _rss_now(),
            "peak_rss_bytes": _peak_rss(),
            "peak_anon_bytes": anon.stop(),
            "device": device,
            "error": "",
        }
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **LORA))
    gc = mode.endswith("-gc")
    if gc:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    build_s = time.perf_counter() - start
    _malloc_trim()
    rss_model = _rss_now()
    layout = adapter_layout(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    loss_fn = None
    if data == "wordnet":
        from fedtune.data.collate import pad_collate
        from fedtune.tasks.causal_lm.loss import answer_loss

        rows, pad_id = wordnet_rows(seq_len, batch * 8, cfg.vocab_size)
        fixed = mode.endswith("-fixpad")
        collate = fixed_collate(pad_id, seq_len) if fixed else pad_collate(pad_id)
        loss_fn = answer_loss
    else:
        from torch.utils.data import default_collate

        rows = [
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            for ids in torch.randint(0, cfg.vocab_size, (batch * 8, seq_len), generator=gen)
        ]
        collate = default_collate
    dp = "dp" in mode.split("-")
    if dp:
        from fedtune.privacy.dpsgd import make_dp_training
        from fedtune.privacy.noise import SeededNoise

        wrapped = make_dp_training(
            module=model,
            optimizer=optimizer,
            data=rows,  # type: ignore[arg-type]
            collate_fn=collate,
            expected_batch_size=batch,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            generator=gen,
            noise=SeededNoise(0),
        )
        module, opt, batches = wrapped.module, wrapped.optimizer, wrapped.data_loader
    else:
        from torch.utils.data import DataLoader

        module, opt = model, optimizer
        batches = DataLoader(rows, batch_size=batch, collate_fn=collate)  # type: ignore[arg-type]
    dev = torch.device(device)
    precision = "bf16" if mode.endswith("-bf16") else "fp32"
    tokens, padded, seconds, done, losses = 0, 0, 0.0, 0, []
    error = ""
    try:
        while done < steps + warmup:
            for cpu_batch in batches:
                if len(cpu_batch["labels"]) == 0:
                    continue
                t0 = time.perf_counter()
                raw = {k: v.to(device) for k, v in cpu_batch.items()}
                opt.zero_grad(set_to_none=True)
                with compute_precision(precision, dev):  # as fedtune.train.train_local
                    loss = module(**raw).loss if loss_fn is None else loss_fn(module, raw)
                loss.backward()
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if done >= warmup:  # untimed warm-up steps first
                    seconds += time.perf_counter() - t0
                    tokens += int(raw["attention_mask"].sum())
                    padded += int(raw["attention_mask"].numel())
                losses.append(float(loss.detach()))
                done += 1
                if done >= steps + warmup:
                    break
    except Exception as err:  # noqa: BLE001 - recorded: e.g. checkpointing vs Opacus hooks
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return {
        "size": size,
        "mode": mode,
        "base_params": base_params,
        "adapter_params": layout.size,
        "adapter_bytes_fp32": 4 * layout.size,
        "seq_len": seq_len,
        "batch": batch,
        "steps": max(done - warmup, 0),
        "warmup": warmup,
        "tokens_per_s": tokens / seconds if seconds else None,
        "padded_fraction": 1 - tokens / padded if padded else None,
        "data": data,
        "from_disk": bool(model_dir),
        "s_per_step": seconds / max(done - warmup, 1) if seconds else None,
        "build_s": build_s,
        "rss_model_bytes": rss_model,
        "rss_after_bytes": (_malloc_trim(), _rss_now())[1],
        "peak_rss_bytes": _peak_rss(),
        "peak_anon_bytes": anon.stop(),
        "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "device": device,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
        "error": error,
    }


def ckks_cost(length: int) -> dict[str, float]:
    """Encrypt one adapter-length vector with fedtune's CKKS codec: wire bytes, seconds."""
    import numpy as np

    from fedtune import crypto
    from fedtune.secure.ckks import CkksCodec
    from fedtune.secure.codec import payload_nbytes

    codec = CkksCodec(crypto.make_secret_context(), length=length)
    vector = np.random.default_rng(0).normal(0, 0.01, length)
    start = time.perf_counter()
    payload = codec.encode(vector)
    seconds = time.perf_counter() - start
    return {"ckks_bytes": payload_nbytes(payload), "ckks_encrypt_s": seconds}


def check_gc_with_opacus() -> str:
    """Per-example gradients with and without checkpointing on a tiny Llama: equal?"""
    import torch
    from opacus.grad_sample import GradSampleModule
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore")
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(
            LlamaForCausalLM(cfg), LoraConfig(task_type=TaskType.CAUSAL_LM, **LORA)
        )
        for n, p in model.named_parameters():  # B = 0 at init would hide a mismatch
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        if gc:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        try:
            gsm(input_ids=ids, labels=ids).loss.backward()
        except Exception as err:  # noqa: BLE001 - the answer is the error
            return f"error with checkpointing: {type(err).__name__}: {str(err).splitlines()[0]}"
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, p in trainable if getattr(p, "grad_sample", None) is None]
        if missing:
            return (
                f"{'with' if gc else 'without'} checkpointing, Opacus computed no per-example "
                f"gradient for {len(missing)} of {len(trainable)} LoRA tensors (e.g. "
                f"{missing[0]}): not compatible, and DP-SGD would fail or skip them"
            )
        grads.append([p.grad_sample.clone() for _, p in trainable])
    diff = max(float((a - b).abs().max()) for a, b in zip(*grads, strict=True))
    return f"max |per-example grad with - without checkpointing| = {diff:.3g}"


def bench_model_dir(size: str, root: Path) -> Path:
    """A random-weight ``size``-shaped Llama saved under ``root`` (bfloat16, as published).

    Written once and reused: the ``load*`` modes and ``--from-disk`` read it back through
    fedtune's loader, as a node reads a real checkpoint.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / size
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], max_position_embeddings=2048))
    model.to(torch.bfloat16).save_pretrained(str(out))
    return out


def _child(size: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    disk = args.from_disk or mode.startswith("load")
    model_dir = str(bench_model_dir(size, args.model_root)) if disk else ""
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{size}:{mode}",
        "--seq-len",
        str(args.seq_len),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--data",
        args.data,
        "--model-dir",
        model_dir,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return {"size": size, "mode": mode, "error": f"exit {proc.returncode}: {tail}"}
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - start
    return out


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _label(r: dict[str, Any]) -> str:
    """The mode, marked when a training mode loaded its model from disk."""
    disk = r.get("from_disk") and not str(r["mode"]).startswith("load")
    return f"{r['mode']} (from disk)" if disk else str(r["mode"])


def _note(r: dict[str, Any]) -> str:
    if r.get("error"):
        return str(r["error"])
    notes = []
    if r.get("from_disk") or str(r.get("mode", "")).startswith("load"):
        notes.append("loaded from disk (bf16 checkpoint)")
    if r.get("data") == "wordnet":
        notes.append(f"WordNet lengths, {r.get('padded_fraction') or 0:.0%} padding")
    if str(r.get("mode", "")).startswith("load"):
        notes.append(f"load {r.get('build_s', 0):.0f} s")
    return "; ".join(notes)


def write_table(results: list[dict[str, Any]], ckks: dict[str, dict[str, float]], host: str) -> str:
    lines = [
        f"Machine: {host}. Sequence length {results[0].get('seq_len')}, batch "
        f"{results[0].get('batch')}, LoRA r=8 on q_proj,v_proj, fp32 compute.",
        "",
        "| model | mode | base params | peak RSS GiB | peak anon GiB | RSS after GiB | tokens/s "
        "| s/step | adapter params | adapter MB (fp32) | CKKS MB/round | CKKS encrypt s | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = ckks.get(r["size"], {})
        tps = r.get("tokens_per_s")
        sps = r.get("s_per_step")
        lines.append(
            f"| {r['size']} | {r['mode']} | {r.get('base_params', 0) / 1e6:.0f}M "
            f"| {_gib(r.get('peak_rss_bytes'))} | {_gib(r.get('peak_anon_bytes'))} "
            f"| {_gib(r.get('rss_after_bytes'))} "
            f"| {'-' if tps is None else f'{tps:.1f}'} | {'-' if sps is None else f'{sps:.1f}'} "
            + (
                f"| {r['adapter_params']:,} | {r['adapter_bytes_fp32'] / 1e6:.2f} "
                f"| {c.get('ckks_bytes', 0) / 1e6:.1f} | {c.get('ckks_encrypt_s', 0):.2f} "
                if r.get("adapter_params")
                else "| - | - | - | - "  # a load* row: no adapter
            )
            + f"| {_note(r)} |"
        )
    return "\n".join(lines)


def plot(
    results: list[dict[str, Any]], ckks: dict[str, dict[str, float]], host: str, out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    order = sorted(results, key=lambda r: (MODES.index(r["mode"]), bool(r.get("from_disk"))))
    for mode in dict.fromkeys(_label(r) for r in order):
        rows = sorted(
            (r for r in results if _label(r) == mode and r.get("peak_rss_bytes")),
            key=lambda r: r["base_params"],
        )
        if not rows:
            continue
        x = [r["base_params"] / 1e6 for r in rows]
        (line,) = axes[0].plot(x, [r["peak_rss_bytes"] / 2**30 for r in rows], "o-", label=mode)
        axes[0].plot(x, [r["rss_after_bytes"] / 2**30 for r in rows], "x:", color=line.get_color())
        ok = [r for r in rows if r.get("tokens_per_s")]
        axes[1].plot(
            [r["base_params"] / 1e6 for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=mode
        )
    axes[0].set(
        xlabel="base parameters (M)",
        ylabel="RSS (GiB)",
        title="node memory: peak (o) and after a step (x)",
    )
    axes[1].set(
        xlabel="base parameters (M)", ylabel="tokens / s", title="training speed", yscale="log"
    )
    sizes = [s for s in SIZES if s in ckks]
    lengths = [ckks[s]["adapter_params"] / 1e6 for s in sizes]
    axes[2].plot(lengths, [ckks[s]["ckks_bytes"] / 1e6 for s in sizes], "o-", label="CKKS MB")
    axes[2].plot(
        lengths, [4 * ckks[s]["adapter_params"] / 1e6 for s in sizes], "s--", label="fp32 MB"
    )
    ax2 = axes[2].twinx()
    ax2.plot(lengths, [ckks[s]["ckks_encrypt_s"] for s in sizes], "^:", color="gray")
    ax2.set_ylabel("CKKS encrypt s (gray)")
    for s, x in zip(sizes, lengths, strict=True):
        axes[2].annotate(s, (x, ckks[s]["ckks_bytes"] / 1e6))
    axes[2].set(xlabel="adapter parameters (M)", ylabel="MB per round", title="payload per round")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"fedtune at real model sizes (random-weight Llama shapes) on {host}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def save_model(size: str, out: Path) -> Path:
    """Write a random-weight ``size``-shaped Llama with the bundled SmolLM2 tokenizer.

    The federation in simulations/scale-1b.toml trains on it (nothing is downloaded): the
    body has ``size``'s shape, the vocabulary is the tokenizer's (49,152 for SmolLM2),
    the weights are saved in bfloat16 (fedtune loads them in float32).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune.tasks.causal_lm.model import default_causal_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_causal_model_path()))
    shape = {**SIZES[size], "vocab_size": len(tokenizer)}
    cfg = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote a random-weight {size}-shaped Llama ({params / 1e9:.2f}B parameters) to {out}")
    return out


def merge(args: argparse.Namespace) -> None:
    """Combine several runs' results.json into one table and plot."""
    merged: dict[str, Any] = {"results": [], "ckks": {}}
    for name in args.merge.split(","):
        part = json.loads(Path(name).read_text())
        merged["machine"] = part["machine"]
        merged["results"] += part["results"]
        merged["ckks"].update(part["ckks"])
    merged["results"].sort(
        key=lambda r: (
            list(SIZES).index(r["size"]),
            MODES.index(r["mode"]),
            bool(r.get("from_disk")),
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(merged, indent=1))
    table = write_table(merged["results"], merged["ckks"], merged["machine"])
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot(merged["results"], merged["ckks"], merged["machine"], args.plot or args.out / "scale.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="135M,360M,1.1B", help=f"comma-separated, of {', '.join(SIZES)}"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {MODES}")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--save-model", type=Path, default=None, help="write a random-weight --sizes model here"
    )
    parser.add_argument(
        "--merge", default="", help="comma-separated results.json files: table and plot only"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default OUT/scale.png)")
    parser.add_argument("--check-gc", action="store_true", help="checkpointing vs Opacus, tiny")
    parser.add_argument(
        "--data",
        default="random",
        choices=("random", "wordnet"),
        help="random: full rows of random ids; wordnet: the causal-LM task's real examples",
    )
    parser.add_argument(
        "--from-disk",
        action="store_true",
        help="training modes load a saved model through fedtune's loader (int8: as it loads)",
    )
    parser.add_argument(
        "--model-root",
        type=Path,
        default=ROOT / "runs" / "bench-models",
        help="where the random-weight models for load* / --from-disk are saved (once)",
    )
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        size, mode = args.one.split(":")
        out = run_one(
            size,
            mode,
            seq_len=args.seq_len,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            model_dir=args.model_dir,
            data=args.data,
        )
        print(json.dumps(out))
        return
    if args.merge:
        merge(args)
        return
    if args.save_model:
        save_model(args.sizes.split(",")[0], args.save_model)
        return
    host = machine()
    print(f"machine: {host}", flush=True)
    if args.check_gc:
        print("gradient checkpointing + Opacus:", check_gc_with_opacus(), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    ckks: dict[str, dict[str, float]] = {}
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            r = _child(size, mode, args)
            results.append(r)
            print(json.dumps(r), flush=True)
            if size not in ckks and r.get("adapter_params"):
                ckks[size] = {
                    "adapter_params": r["adapter_params"],
                    **ckks_cost(r["adapter_params"]),
                }
                print(json.dumps({"size": size, **ckks[size]}), flush=True)
            (args.out / "results.json").write_text(
                json.dumps({"machine": host, "results": results, "ckks": ckks}, indent=1)
            )
    table = write_table(results, ckks, host)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot(results, ckks, host, args.plot or args.out / "scale.png")


if __name__ == "__main__":
    main()
