#!/usr/bin/env bash
# Set up (if needed, with the dev tools) and run the lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
ruff check fedtune tests benchmarks simulations scripts
mypy fedtune
exec python -m pytest -q "$@"
