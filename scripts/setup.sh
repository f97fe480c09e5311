#!/usr/bin/env bash
# Creates .venv beside this checkout and installs ditas with its test tools (idempotent).
# torch is pinned to the CPU build 2.13.0 in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
stamp=".venv/.ditas-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing ditas and its dependencies into .venv (about a minute)" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e ".[test]"
    touch "$stamp"
fi
