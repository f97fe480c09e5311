"""Domain metrics of a digit DiT (default: the embedded model) and its sample grid.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_default_model.py \
        --n 500 --steps 50 --cfg 1.5 4.0 --json docs/default_model_metrics.json --grid docs/default_grid.png

For every guidance scale: ``n`` samples with balanced labels (i % 10), 50 ancestral DDPM steps,
seed 0, then ``evaluate_digit_samples`` (class accuracy, domain FID vs the 500 held-out digits,
k=3 precision/recall). The grid shows classes 0..9 as columns at the last guidance scale.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ditas.diffusion.batches import generate
from ditas.diffusion.images import decode_to_uint8, make_grid, save_png
from ditas.evaluation.digits import evaluate_digit_samples, load_classifier
from ditas.fileio import atomic_file
from ditas.loaders import load_dit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path (default: the embedded default model)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.5, 4.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", help="write all results here")
    p.add_argument("--grid", help="write a PNG grid (classes 0..9 as columns) here")
    p.add_argument("--grid-rows", type=int, default=4)
    args = p.parse_args()

    model = load_dit(args.model)
    classifier = load_classifier()
    labels = np.arange(args.n) % 10
    results = {"model": args.model or "embedded default", "n": args.n, "steps": args.steps,
               "sampler": args.sampler, "seed": args.seed, "torch_threads": torch.get_num_threads(),
               "runs": []}
    print(f"{'cfg':>5} {'acc':>7} {'FID':>8} {'prec':>6} {'recall':>6} {'time_s':>7}")
    for cfg in args.cfg:
        t0 = time.perf_counter()
        samples = generate(model, labels, steps=args.steps, cfg_scale=cfg, sampler=args.sampler,
                           seed=args.seed, batch_size=args.batch_size, progress=False)
        gen_time = time.perf_counter() - t0
        images = decode_to_uint8(model, samples)
        m = evaluate_digit_samples(images, labels, classifier=classifier)
        m.update(cfg_scale=cfg, generation_time_s=round(gen_time, 1))
        results["runs"].append(m)
        print(f"{cfg:>5} {m['class_accuracy']:>7.4f} {m['fid']:>8.3f} {m['precision']:>6.3f} "
              f"{m['recall']:>6.3f} {gen_time:>7.1f}", flush=True)
    if args.grid:
        grid_labels = np.tile(np.arange(10), args.grid_rows)
        samples = generate(model, grid_labels, steps=args.steps, cfg_scale=args.cfg[-1], sampler=args.sampler,
                           seed=args.seed, batch_size=args.batch_size, progress=False)
        save_png(make_grid(decode_to_uint8(model, samples), nrow=10), args.grid)
        print(f"grid written to {args.grid}")
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
