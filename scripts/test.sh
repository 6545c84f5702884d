#!/usr/bin/env bash
# Sets up (idempotent) and runs the fast test suite. pytest's exit status is kept:
# a run that collects no test (exit 5) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -q --durations=15 tests "$@"
