#!/usr/bin/env bash
# Set up .venv with pinned versions (once), then run the suite on jax,
# tensorflow and torch. Usage: bash tools/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! cmp -s requirements/ci.txt .venv/.ci-requirements; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements/ci.txt
  # open_clip ships the real CLIP BPE merges used by the tokenizer parity tests;
  # without --no-deps it would pull torchvision, which breaks torch 2.13.
  .venv/bin/python -m pip install -q --no-deps open_clip_torch==3.3.0
  .venv/bin/python -m pip install -q --no-deps -e .
  cp requirements/ci.txt .venv/.ci-requirements
fi

.venv/bin/python -m ruff check src tests tools benchmarks
status=0
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend"
  start=$(date +%s)
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -n 2 "$@" || status=1
  echo "=== KERAS_BACKEND=$backend took $(( $(date +%s) - start )) s"
done
exit $status
