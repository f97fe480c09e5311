#!/usr/bin/env bash
# Runs the exactness tests (pytest -m exactness) under other CPU code paths than this machine's
# own: ATen's scalar kernels (ATEN_CPU_CAPABILITY=default: other rounding in linear, layer norm,
# GELU, softmax, and another normal_ sampler) and oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2:
# no VNNI, where int8 products saturate). A test that holds here but assumes this CPU's rounding
# fails here, as it would on another machine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 exec "$PY" -m pytest -q -m exactness "$@"
