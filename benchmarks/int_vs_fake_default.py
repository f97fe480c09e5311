"""Integer backend vs simulated path on the default model's own samples (PSNR), with yardsticks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int_vs_fake_default.py --num 100 --steps 50

Quantizes the embedded default model with the ``ditas`` recipe (W4A8; 16 calibration labels, 50
steps), saves it, loads it with ``kernel="auto"`` and ``kernel="simulated"`` and samples both from the
same noise and labels (cfg 4.0, DDPM). Prints the PSNR between them next to two yardsticks: the
simulated model against itself from the start noise scaled by (1 + 1e-6) (how chaotic sampling of
a quantized model is: a change of one ulp flips activation codes), and the simulated model
against FP (the quantization error). ``tests/test_default_model_backends.py`` checks the same
relations at 10 steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

import ditas
from ditas.diffusion.batches import generate
from ditas.diffusion.images import decode_to_uint8, start_noise
from ditas.evaluation.metrics import psnr
from ditas.quantization.apply import quantize
from ditas.quantization.checkpoint import save_quantized
from ditas.quantization.recipes import recipe_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()

    fp = ditas.load_dit()
    cfg = recipe_config("ditas")
    q, report = quantize(fp, cfg, progress=False)
    labels = np.arange(args.num) % 10
    z = start_noise(fp, args.num, args.seed)

    def run(model, zz):
        x = generate(model, labels, steps=args.steps, cfg_scale=args.cfg, seed=args.seed, batch_size=args.num,
                     progress=False, z=zz)
        return decode_to_uint8(model, x)

    with tempfile.TemporaryDirectory() as tmp:
        path = save_quantized(q, f"{tmp}/q", cfg, report)
        t0 = time.perf_counter()
        fake = run(ditas.load_dit(path, kernel="simulated"), z)
        t_fake = time.perf_counter() - t0
        t0 = time.perf_counter()
        real = run(ditas.load_dit(path, kernel="auto"), z)
        t_int = time.perf_counter() - t0
        fake_pert = run(ditas.load_dit(path, kernel="simulated"), z * (1 + 1e-6))
    ref = run(fp, z)
    out = {"num": args.num, "steps": args.steps, "cfg": args.cfg,
           "psnr_int_vs_fake_db": psnr(real, fake),
           "psnr_fake_vs_fake_perturbed_1e-6_db": psnr(fake_pert, fake),
           "psnr_fake_vs_fp_db": psnr(fake, ref), "psnr_int_vs_fp_db": psnr(real, ref),
           "sampling_time_fake_s": round(t_fake, 1), "sampling_time_int_s": round(t_int, 1)}
    for k, v in out.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
