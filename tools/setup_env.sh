#!/usr/bin/env bash
# Create .venv with the pinned versions of requirements/ci.txt (once; redone
# when that file changes). Sourced by tools/run_tests.sh and tools/demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ] || ! cmp -s requirements/ci.txt .venv/.ci-requirements; then
  echo "Setting up .venv (pinned versions from requirements/ci.txt)..."
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements/ci.txt
  # open_clip ships the real CLIP BPE merges used by the tokenizer parity tests;
  # without --no-deps it would pull torchvision, which breaks torch 2.13.
  .venv/bin/python -m pip install -q --no-deps open_clip_torch==3.3.0
  .venv/bin/python -m pip install -q --no-deps -e .
  cp requirements/ci.txt .venv/.ci-requirements
fi
