"""Relative output error vs FP of W4A8 recipes on a tiny random diffusers ``DiTTransformer2DModel``
with untied per-block embedders and outlier channels (``tests/quant_helpers.tiny_diffusers_dit``),
and the error of every smoothing fold with quantization switched off.

A tiny random model: this shows the seam's DiT-from-diffusers path (groups of separate q/k/v, the
fold into to_v, untied embedders kept) behaves as the method says; it says nothing about a real
checkpoint. Same record (4 steps, 2 labels + null labels) for every recipe, adaLN kept float.

    OMP_NUM_THREADS=1 python benchmarks/diffusers_dit_tiny.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from quant_helpers import class_loop_calls, fold_smoothing_in_float, tiny_diffusers_dit  # noqa: E402

import ditas  # noqa: E402
from ditas.quantization.apply import calibrate  # noqa: E402

RECIPES = ("rtn", "smoothquant", "tas_search", "ditas")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    g = torch.Generator().manual_seed(7)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([900, 500, 50]), torch.randint(0, 10, (3,), generator=g)
    print(f"{'seed':>4} {'fold error':>11} " + " ".join(f"{r:>12}" for r in RECIPES) + "   ditas/rtn  ditas/smoothquant")
    for seed in range(args.seeds):
        m = tiny_diffusers_dit(seed)
        with torch.no_grad():
            ref = m(x, timestep=t, class_labels=y).sample
        with ditas.record_calibration(m) as calib:
            class_loop_calls(m, steps=4, seed=seed)
        cal = calibrate(m, ditas.recipe_config("tas", a_bits=16, search_tokens=None), calib, progress=False)
        folded = fold_smoothing_in_float(copy.deepcopy(m), cal)
        with torch.no_grad():
            fold_err = rel(folded(x, timestep=t, class_labels=y).sample, ref)
        errs = {}
        for recipe in RECIPES:
            q = copy.deepcopy(m)
            extra = dict(lora_rank=4, lora_rounds=3) if recipe == "ditas" else {}
            ditas.quantize_(q, ditas.recipe_config(recipe, adaln="float", **extra), calib)
            with torch.no_grad():
                errs[recipe] = rel(q(x, timestep=t, class_labels=y).sample, ref)
        print(f"{seed:>4} {fold_err:>11.2e} " + " ".join(f"{errs[r]:>12.4f}" for r in RECIPES) +
              f"   {errs['ditas'] / errs['rtn']:>9.3f}  {errs['ditas'] / errs['smoothquant']:>17.3f}")


if __name__ == "__main__":
    main()
