#!/usr/bin/env bash
# Set up (if needed) and run the quickstart federation; extra arguments go to
# `fedtune simulate`, e.g. scripts/quickstart.sh --run-dir runs/quickstart
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec fedtune simulate simulations/quickstart.toml "$@"
