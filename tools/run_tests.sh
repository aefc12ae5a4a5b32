#!/usr/bin/env bash
# Set up .venv with pinned versions (once), lint, check the formatting, then run
# the suite on jax, tensorflow and torch. Usage: bash tools/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh

.venv/bin/python -m ruff check src tests tools benchmarks
.venv/bin/python -m ruff format --check src tests tools benchmarks
status=0
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend"
  start=$(date +%s)
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -n 2 "$@" || status=1
  echo "=== KERAS_BACKEND=$backend took $(( $(date +%s) - start )) s"
done
exit $status
