#!/usr/bin/env bash
# Sets up (idempotent) and runs the fast test suite. pytest's exit status is kept:
# a run that collects no test (exit 5) fails. One pytest worker per core, at most 4
# (pytest-xdist); the workers share the session's JAX compilation cache (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -q -n auto --maxprocesses=4 --durations=15 tests "$@"
