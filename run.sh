#!/usr/bin/env bash
# Sets up .venv if needed, then runs ditas. With no arguments: the main job on the embedded
# default model (quantize it with the DiTAS recipe at W4A8, then sample a grid from the result).
# With arguments: `bash run.sh sample --classes 1,2,3 --out grid.png` runs that ditas command.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
if [ $# -gt 0 ]; then
    exec .venv/bin/ditas "$@"
fi
mkdir -p out
# --overwrite: a second run replaces the first run's outputs (ditas replaces only folders it wrote)
.venv/bin/ditas quantize --calib-labels 4 --calib-steps 20 --out out/default-w4a8 --overwrite
.venv/bin/ditas sample --model out/default-w4a8 --classes 0,1,2,3,4,5,6,7,8,9 --steps 50 \
    --out out/default-w4a8-grid.png --overwrite
echo "quantized model: out/default-w4a8 (report.json inside); samples: out/default-w4a8-grid.png"
