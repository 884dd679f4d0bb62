#!/usr/bin/env bash
# The main job: set up, then train, evaluate, decode, save, fine-tune and export a small DeepSeek-V3-style model on
# the Python standard library's sources, on CPU, writing only under demo-out/ (`deepseek-moe demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/deepseek-moe demo "$@"
