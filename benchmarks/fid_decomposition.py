"""Why does a recipe's domain FID move? FID split into its mean and covariance terms, per recipe.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fid_decomposition.py --recipes smoothquant,ditas,lora,ditas_bc \
        --num 1000 --batch-size 100 --json docs/fid_decomposition_default.json

Quantizes the embedded default model with each recipe (W4A8 unless ``--w-bits``/``--a-bits``;
integer backend; default calibration), samples FP and every recipe from the same noise and labels
(``i % 10``, cfg 4.0, DDPM 50 steps) and reports, in the digit classifier's feature space against
the held-out real digits:

- ``fid = mean_term + cov_term``: ``|mu - mu_real|^2`` and
  ``Tr(S + S_real - 2 (S S_real)^(1/2))``;
- ``paired_sq_dist``: mean over samples of ``|f(x_q) - f(x_fp)|^2`` for the same noise (per-sample
  fidelity to FP, in features);
- ``shift_toward_fp_error``: ``(mu - mu_fp) . (mu_fp - mu_real)``; the mean term changes by about
  twice this (plus ``|mu - mu_fp|^2``), so a positive value means the recipe moves the average
  sample further in the direction in which FP already differs from real digits;
- ``psnr_db`` against the FP samples and ``fid_vs_fp``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import ditas
from ditas.diffusion.batches import generate
from ditas.diffusion.images import decode_to_uint8
from ditas.evaluation.digits import extract_features, load_classifier, reference_features
from ditas.evaluation.metrics import frechet_distance, psnr
from ditas.quantization.apply import quantize
from ditas.quantization.recipes import recipe_config


def fid_terms(feats: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(mean term, covariance term) of the Fréchet distance between two feature sets (the
    covariance term as the evaluator's FID minus the mean term, so the two add up to it)."""
    mean_term = float(((feats.mean(0) - ref.mean(0)) ** 2).sum())
    return mean_term, frechet_distance(feats, ref) - mean_term


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="smoothquant,ditas")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()

    fp = ditas.load_dit()
    labels = torch.arange(args.num) % fp.num_classes
    kw = dict(steps=args.steps, cfg_scale=args.cfg, seed=args.seed, batch_size=args.batch_size, progress=False)
    clf = load_classifier()
    ref = reference_features(clf)
    images = {"fp": decode_to_uint8(fp, generate(fp, labels, **kw))}
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        t0 = time.perf_counter()
        q, _ = quantize(fp, recipe_config(name, w_bits=args.w_bits, a_bits=args.a_bits), progress=False,
                        kernel="auto")
        images[name] = decode_to_uint8(q, generate(q, labels, **kw))
        print(f"{name}: quantized and sampled in {time.perf_counter() - t0:.0f} s", flush=True)
    feats = {k: extract_features(clf, v) for k, v in images.items()}
    mu_fp, mu_r = feats["fp"].mean(0), ref.mean(0)
    rows = {}
    for name, f in feats.items():
        mean_term, cov_term = fid_terms(f, ref)
        rows[name] = {
            "fid": mean_term + cov_term, "mean_term": mean_term, "cov_term": cov_term,
            "paired_sq_dist": float(((f - feats["fp"]) ** 2).sum(1).mean()),
            "shift_toward_fp_error": float(np.dot(f.mean(0) - mu_fp, mu_fp - mu_r)),
            "psnr_db": None if name == "fp" else float(psnr(images[name], images["fp"])),
            "fid_vs_fp": 0.0 if name == "fp" else frechet_distance(f, feats["fp"]),
            "mean_pixel": float(images[name].mean()),
        }
    print("| recipe | FID | mean term | cov term | paired feature dist^2 | shift toward FP's error | PSNR vs FP | "
          "FID vs FP | mean pixel |")
    print("| --- |" + " ---: |" * 8)
    for name, r in rows.items():
        ps = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        print(f"| {name} | {r['fid']:.2f} | {r['mean_term']:.2f} | {r['cov_term']:.2f} | {r['paired_sq_dist']:.2f} | "
              f"{r['shift_toward_fp_error']:.2f} | {ps} | {r['fid_vs_fp']:.2f} | {r['mean_pixel']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "recipes": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
