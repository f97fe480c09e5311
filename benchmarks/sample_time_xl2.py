"""Time per 10K samples of a DiT-XL/2-shaped model on this CPU, extrapolated from a few steps.

What ``ditas benchmark`` spends per row of the paper's table (FID-10K, 50 or 100 steps, cfg 1.5:
every step runs the model on the conditional and the null-label half, 2N images): the sampling
loop of ``ditas.diffusion.images.generate`` with a random-weight DiT-XL/2 (depth 28, hidden
1152, patch 2, 32x32x4 latent = 256 px), and the Inception network of ``ditas eval`` on 256x256
images. The VAE decode is not included (no VAE weights here). Prints the CPU (lscpu) with the table.

    .venv/bin/python benchmarks/sample_time_xl2.py --images 2 --steps 2 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ditas.diffusion.batches import generate
from ditas.model.dit import DiT, DiTConfig
from machine import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2, help="images sampled (batch)")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps timed")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--inception-images", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DiT(DiTConfig()).eval()  # DiT-XL/2 shape, random weights
    labels = torch.arange(args.images) % 1000
    generate(model, labels[:1], steps=2, cfg_scale=1.5, batch_size=args.images, progress=False)  # warm-up
    t0 = time.perf_counter()
    generate(model, labels, steps=args.steps, cfg_scale=1.5, batch_size=args.images, progress=False)
    per_image_step = (time.perf_counter() - t0) / (args.images * args.steps)
    rows = [("DiT-XL/2 fp32 sampling, cfg 1.5, per image and step", per_image_step, 1.0)]
    try:
        from ditas.evaluation.inception import InceptionFeatures

        net = InceptionFeatures("cpu")
        imgs = np.random.default_rng(0).integers(0, 256, (args.inception_images, 256, 256, 3), dtype=np.uint8)
        net(imgs[:1])
        t0 = time.perf_counter()
        net(imgs)
        rows.append(("Inception (FID/sFID features), per 256x256 image", (time.perf_counter() - t0) / len(imgs), 1.0))
    except Exception as exc:  # noqa: BLE001 - the fid extra is optional here
        print(f"(Inception not timed: {exc})")
    print(f"CPU: {cpu_name()}, {args.threads} threads; {args.images} images x {args.steps} steps timed")
    print("| what | seconds | 10K images, 50 steps (h) | 10K images, 100 steps (h) |")
    print("|---|---:|---:|---:|")
    for name, sec, _ in rows:
        if name.startswith("DiT"):
            print(f"| {name} | {sec:.2f} | {sec * 1e4 * 50 / 3600:.0f} | {sec * 1e4 * 100 / 3600:.0f} |")
        else:
            print(f"| {name} | {sec:.3f} | {sec * 1e4 / 3600:.2f} (once per row) | {sec * 1e4 / 3600:.2f} |")


if __name__ == "__main__":
    main()
