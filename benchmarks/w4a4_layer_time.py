"""Paired timing of the per-layer search (docs/quantization.md, "W4A4"): ``ditas`` at W4A8 against
the W4A4 recipes, on the default model's four layer shapes with synthetic inputs of the recorded
size (50 steps x 512 tokens, a few outlier channels), recipes interleaved layer by layer so that a
shared machine's load hits all alike. One thread.

    OMP_NUM_THREADS=1 python benchmarks/w4a4_layer_time.py [extra recipes run at W4A4 per token ...]
"""

from __future__ import annotations

import sys
import time

import torch

from ditas.calibration.inputs import LayerInputs
from ditas.quantization.recipes import recipe_config
from ditas.quantization.search import quantize_layer

SHAPES = [("qkv", 192, 576), ("proj", 192, 192), ("fc1", 192, 768), ("fc2", 768, 192)]  # role, in, out


def synthetic_inputs(width: int, g: torch.Generator, steps: int = 50, tokens: int = 512) -> LayerInputs:
    """Gaussian inputs with 3 % of the channels 15x larger (activation outliers), as ``LayerInputs``."""
    scale = torch.where(torch.rand(width, generator=g) < 0.03, 15.0, 1.0)
    xs = [torch.randn(tokens, width, generator=g) * scale for _ in range(steps)]
    return LayerInputs(xs, torch.stack([x.amin(0) for x in xs]), torch.stack([x.amax(0) for x in xs]),
                       torch.stack([x.abs().amax(0) for x in xs]).amax(0))


def main(extra: list[str]) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    cfgs = {"ditas@w4a8": recipe_config("ditas"),
            "ditas@w4a4(token)": recipe_config("ditas", a_bits=4, act_granularity="token"),
            "ditas_w4a4": recipe_config("ditas_w4a4"),
            **{name: recipe_config(name, a_bits=4, act_granularity="token") for name in extra}}
    total = dict.fromkeys(cfgs, 0.0)
    for role, width, out in SHAPES:
        inputs = synthetic_inputs(width, g)
        w, b = torch.randn(out, width, generator=g) * 0.05, torch.randn(out, generator=g) * 0.1
        for name, cfg in cfgs.items():
            t0 = time.perf_counter()
            r = quantize_layer(role, role, w, b, inputs, cfg)
            dt = time.perf_counter() - t0
            total[name] += dt
            print(f"{role} {name} {dt:.1f}s rel_out_err={r.rel_out_err:.4g}", flush=True)
    base = total["ditas@w4a8"]
    print({k: round(v, 1) for k, v in total.items()}, {k: round(v / base, 2) for k, v in total.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
