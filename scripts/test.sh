#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite (fast tests; add `-m slow` for the slow ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
