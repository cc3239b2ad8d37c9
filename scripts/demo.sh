#!/usr/bin/env bash
# The main job: sets everything up (.venv, torch, the extension), then trains a
# small model with one injected failure and shows what torchhealth reports.
#   bash scripts/demo.sh [--scenario nan|lr|vanishing|fp16|dead|relu] [--steps N] [--log-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m torchhealth.demo "$@"
