"""Where along the sampling run a quantized model's eps error lies: per-step eps MSE vs FP.

    OMP_NUM_THREADS=1 python benchmarks/eps_by_step.py --recipes ditas_w4a4,ditas_w4a4+norot \
        --num 32 --steps 50 --cfg 1.5

``ditas compare``'s "eps MSE vs FP" is the mean over the steps of the guided eps error along FP's
trajectory. This prints that error step by step (every 5th step and the last 5), for recipes
quantized from the embedded default model as ``ditas compare`` does: the mean hides where the
error is (at the last steps, t near 0, eps errors are large and weigh little on a DDPM sample).
A ``+norot`` suffix quantizes the recipe with ``rotation="none"``.
"""

from __future__ import annotations

import argparse
import json

import torch

import ditas
from ditas.diffusion.run import SamplingSettings, eps_trajectory
from ditas.diffusion.samplers import guided_model_fn
from ditas.fileio import atomic_file
from ditas.quantization.apply import quantize
from ditas.quantization.recipes import recipe_config


@torch.no_grad()
def step_errors(model, trajectory, y: torch.Tensor, cfg: float) -> list[float]:
    """The guided eps MSE against FP's at each recorded (x_t, t, eps) of FP's trajectory."""
    fn, _ = guided_model_fn(model, y, cfg)
    c = model.config.in_channels
    return [float(((fn(x, t)[:, :c] - eps) ** 2).mean()) for x, t, eps in trajectory]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="float DiT (default: the embedded default model)")
    p.add_argument("--recipes", default="ditas_w4a4,ditas_w4a4+norot")
    p.add_argument("--num", type=int, default=32, help="trajectories (labels i % classes)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()

    fp = ditas.load_dit(args.model)
    labels = (torch.arange(args.num) % fp.num_classes).tolist()
    trajectory = eps_trajectory(fp, labels, SamplingSettings(steps=args.steps, cfg_scale=args.cfg, seed=args.seed))
    y = torch.as_tensor(labels, dtype=torch.long)
    errors = {}
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        recipe, _, suffix = name.partition("+")
        extra = {"rotation": "none"} if suffix == "norot" else {}
        q, _ = quantize(fp, recipe_config(recipe, steps=args.steps, **extra), progress=False)
        errors[name] = step_errors(q, trajectory, y, args.cfg)
        share = errors[name][-1] / sum(errors[name])
        print(f"{name}: mean {sum(errors[name]) / len(errors[name]):.4f}, last step {share:.0%} of the sum", flush=True)
    ts = [int(t[0]) for _, t, _ in trajectory]
    print("step  t    " + "  ".join(f"{n:>16}" for n in errors))
    for i, t in enumerate(ts):
        if i % 5 == 0 or i >= len(ts) - 5:
            print(f"{i:>4} {t:>4}  " + "  ".join(f"{errors[n][i]:>16.4f}" for n in errors))
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"num": args.num, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
                                       "timesteps": ts, "eps_mse_by_step": errors}, indent=2))


if __name__ == "__main__":
    main()
