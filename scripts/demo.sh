#!/usr/bin/env bash
# The main job: set up, then build a small preset model and generate from it (`deepseek-moe demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/deepseek-moe demo "$@"
