#!/usr/bin/env bash
# Set up, then run the test suite (heavier tests are marked `slow` and opt-in: `scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# transformers' own common model tests for the installed version (run by tests/test_transformers_common.py).
.venv/bin/python scripts/fetch_transformers_tests.py
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
.venv/bin/python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
