"""How much classifier-free guidance each quantized recipe keeps, along the FP model's trajectory.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_strength.py \
        --recipes rtn,smoothquant,ditas --num 32 --steps 50 --json docs/guidance_strength_default.json

Guided sampling uses ``eps = u + s * d`` with ``u`` the unconditional prediction and ``d = c - u``
the guidance direction (conditional minus unconditional). For every recipe (quantized from the
embedded default model as ``ditas compare`` does) this evaluates ``c`` and ``u`` at the FP model's
own guided trajectory (``num`` samples, labels i % 10, every step) and reports

- ``guidance_gain``: sum <d_q, d_fp> / sum |d_fp|^2, how much of FP's guidance direction the
  quantized model keeps (1 = all; below 1 = weaker guidance, as if sampled at cfg s * gain);
- ``guidance_rel_error``: |d_q - d_fp| / |d_fp|, and ``uncond_rel_error``: |u_q - u_fp| / |u_fp|;
- the same gain over the first, middle and last third of the steps (high to low noise).

Weaker guidance means more diverse, less "over-guided" samples; at cfg 4.0 that alone moves a
model's domain FID (see ``eval_default_model.py --cfg ...``), independently of fidelity to FP.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import ditas
from ditas.diffusion.run import SamplingSettings, eps_trajectory
from ditas.diffusion.samplers import guided_model_fn
from ditas.fileio import atomic_file
from ditas.quantization.apply import quantize
from ditas.quantization.recipes import recipe_config


@torch.no_grad()
def guidance_parts(model, x: torch.Tensor, t: torch.Tensor, y_full: torch.Tensor, channels: int):
    """(conditional - unconditional, unconditional) predictions for the [cond; uncond] batch."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y_full)[:, :channels]
    cond, uncond = out.chunk(2)
    return cond - uncond, uncond


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="float DiT (default: the embedded default model)")
    p.add_argument("--recipes", default="rtn,smoothquant,ditas")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--num", type=int, default=32, help="trajectories (labels i % classes)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    if args.cfg <= 1.0:
        p.error("--cfg must be above 1 (no guidance, nothing to measure)")

    fp = ditas.load_dit(args.model)
    channels = fp.config.in_channels
    labels = (torch.arange(args.num) % fp.num_classes).tolist()
    _, y_full = guided_model_fn(fp, torch.as_tensor(labels, dtype=torch.long), args.cfg)  # [labels; null labels]
    trajectory = eps_trajectory(fp, labels, SamplingSettings(steps=args.steps, cfg_scale=args.cfg, seed=args.seed))
    ref = [guidance_parts(fp, x, t, y_full, channels) for x, t, _ in trajectory]
    thirds = np.array_split(np.arange(len(trajectory)), 3)

    results = {"num": args.num, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
               "w_bits": args.w_bits, "a_bits": args.a_bits, "recipes": {}}
    print(f"{'recipe':<12} {'gain':>7} {'gain hi/mid/lo noise':>22} {'d rel.err':>9} {'u rel.err':>9}")
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        cfg = recipe_config(name, w_bits=args.w_bits, a_bits=args.a_bits, steps=args.steps)
        q, _ = quantize(fp, cfg, progress=False)
        dots, norms, d_err, u_err, u_norm = [], [], [], [], []
        for (x, t, _), (d_fp, u_fp) in zip(trajectory, ref):
            d_q, u_q = guidance_parts(q, x, t, y_full, channels)
            dots.append(float((d_q * d_fp).sum()))
            norms.append(float((d_fp * d_fp).sum()))
            d_err.append(float(((d_q - d_fp) ** 2).sum()))
            u_err.append(float(((u_q - u_fp) ** 2).sum()))
            u_norm.append(float((u_fp * u_fp).sum()))
        dots, norms = np.array(dots), np.array(norms)
        row = {"guidance_gain": float(dots.sum() / norms.sum()),
               "guidance_gain_by_third": [float(dots[i].sum() / norms[i].sum()) for i in thirds],
               "guidance_rel_error": float(np.sqrt(sum(d_err) / norms.sum())),
               "uncond_rel_error": float(np.sqrt(sum(u_err) / sum(u_norm)))}
        results["recipes"][name] = row
        by_third = "/".join(f"{g:.3f}" for g in row["guidance_gain_by_third"])
        print(f"{name:<12} {row['guidance_gain']:>7.4f} {by_third:>22} {row['guidance_rel_error']:>9.4f} "
              f"{row['uncond_rel_error']:>9.4f}", flush=True)
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
