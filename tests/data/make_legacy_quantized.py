"""Writes tests/data/legacy_quantized_v1: a quantized folder saved by ditas BEFORE model families
(main at 2c84e6c), with the outputs that code computed and its calibration trajectory, so later code
can prove it still loads it and, from the same trajectory, still quantizes to the same model.

Run with the old sources first on the path:  PYTHONPATH=<old checkout>/src python tests/data/make_legacy_quantized.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quant_helpers import random_dit  # noqa: E402

from ditas.quantization.apply import quantize  # noqa: E402
from ditas.quantization.checkpoint import save_quantized  # noqa: E402
from ditas.quantization.recipes import recipe_config  # noqa: E402

out = Path(__file__).resolve().parent / "legacy_quantized_v1"
m = random_dit(3, hidden=32, depth=2, heads=2)
cfg = recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4, lora_rounds=2, alpha_grid=(0.3, 0.7))
from ditas.quantization.apply import record  # noqa: E402

traj = record(m, cfg, progress=False)  # the calibration trajectory, kept to replay it later
save_file({f"{k}.{i}": v.contiguous() for k, vs in (("tokens", traj.tokens), ("cond", traj.cond)) for i, v in enumerate(vs)},
          str(out.parent / "legacy_quantized_v1_trajectory.safetensors"))
q, report = quantize(m, cfg, traj, progress=False)
save_quantized(q, out, cfg)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 1, 8, 8, generator=g)
t = torch.tensor([10, 500])
y = torch.tensor([1, 7])
q.eval()
for b in ("fake", "int"):
    for mod in q.modules():
        if hasattr(mod, "backend"):
            mod.backend = b
    with torch.no_grad():
        torch.manual_seed(0)
        save_file({"x": x, "t": t, "y": y, "out": q(x, t, y).contiguous()}, str(out.parent / f"legacy_quantized_v1_{b}.safetensors"))
print("wrote", out)
