#!/usr/bin/env bash
# Creates .venv (if missing) with torch 2.13.0 (CPU) and the test tools, then
# builds torchhealth into it. Safe to run again: it only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
# The optional extras (sinks, report plots, integrations) are installed in the same
# command as the pinned torch, so that none of them can move torch to another version.
.venv/bin/python -m pip install -q --disable-pip-version-check \
  torch==2.13.0 pytest hypothesis numpy ninja setuptools wheel \
  tensorboard wandb lightning transformers accelerate matplotlib pillow
# --no-build-isolation: build against the torch installed above, not another one.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
