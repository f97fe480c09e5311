#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite (fast tests; add `-m slow` for the slow ones).
# Without arguments (what CI runs) the exactness tests then run again under other CPU code paths
# (scripts/test_other_cpu.sh): a test that assumes this CPU's float rounding fails here already.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
if [ "$#" -eq 0 ]; then
    bash scripts/test_other_cpu.sh
fi
