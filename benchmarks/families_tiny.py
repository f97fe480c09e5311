"""Relative output error vs FP of W4A8 recipes on tiny random PixArt / SD3 / SD3.5 / Flux
transformers (the models of ``tests/family_models.py``: 2 heads x 8 dims, outlier channels).

No real weights of these families are reachable from the machine this was written on, so this
only shows that the recipes order as they should on every family's structure (folds, groups,
block-wise replay); it says nothing about image quality of the real models. Prints, per family,
the mean relative error of the transformer output over 4 evaluation calls for each recipe, side
by side, and each recipe's ratio to ``rtn``.

    OMP_NUM_THREADS=1 python benchmarks/families_tiny.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import family_models as fm  # noqa: E402

from ditas.calibration.recording import record_calibration  # noqa: E402
from ditas.quantization.apply import quantize  # noqa: E402
from ditas.quantization.recipes import recipe_config  # noqa: E402

RECIPES = ("rtn", "smoothquant", "tas_search", "ditas")
BUILDERS = {"pixart": fm.tiny_pixart, "sd3": fm.tiny_sd3,
            "sd3.5": lambda seed: fm.tiny_sd3(seed, dual_attention_layers=(0,)), "flux": fm.tiny_flux}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib-steps", type=int, default=8)
    args = ap.parse_args()
    print(f"W4A8, LoRA rank 4 (2 rounds) where the recipe has LoRA; {args.calib_steps} calibration calls of "
          f"batch 2; mean over {args.seeds} model seeds")
    print(f"{'family':8s} " + " ".join(f"{r:>12s}" for r in RECIPES) + "   " +
          " ".join(f"{r + '/rtn':>16s}" for r in RECIPES[1:]) + "   time_s")
    for family, build in BUILDERS.items():
        t0 = time.perf_counter()
        errs = {r: 0.0 for r in RECIPES}
        for seed in range(args.seeds):
            m = build(seed)
            with torch.no_grad(), record_calibration(m) as calib:
                for s in range(args.calib_steps):
                    m(**fm.call_kwargs(m, seed=seed + 1, step=s % 4))
            kw = [fm.call_kwargs(m, seed=seed + 100, step=s) for s in range(4)]
            with torch.no_grad():
                refs = [m(**k)[0] for k in kw]
            for r in RECIPES:
                small_lora = dict(lora_rank=4, lora_rounds=2) if recipe_config(r).lora.rank else {}
                q, _ = quantize(m, recipe_config(r, **small_lora), calib, progress=False)
                with torch.no_grad():
                    errs[r] += sum(rel(q(**k)[0], ref) for k, ref in zip(kw, refs)) / len(kw) / args.seeds
        print(f"{family:8s} " + " ".join(f"{errs[r]:12.4f}" for r in RECIPES) + "   " +
              " ".join(f"{errs[r] / errs['rtn']:16.3f}" for r in RECIPES[1:]) +
              f"   {time.perf_counter() - t0:6.1f}")


if __name__ == "__main__":
    main()
