"""Control for the domain FID of quantized recipes: the FP model plus random noise, no quantization.

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 .venv/bin/python benchmarks/noise_control.py \
        --levels 0.05 0.09 --num 500 --json docs/noise_control_default.json

Samples the embedded default model exactly as ``ditas compare`` does (labels i % 10, 50 DDPM steps,
cfg 4.0, seed 0) but adds independent Gaussian noise of standard deviation ``level`` to every
epsilon prediction (conditional and unconditional halves separately, every step; the learned
variance channel untouched). A quantized model's prediction error has this form: relative to
epsilon (~unit variance) `rtn` W4A8's is ~0.09 (``guidance_strength.py``: ``uncond_rel_error``).
If such noise alone moves the domain FID as far as quantization does, the domain FID of W4A8
recipes measures how much their errors perturb sampling, not how faithfully they reproduce FP.
Prints class accuracy, domain FID, FID vs the unperturbed samples, precision, recall, PSNR.
"""

from __future__ import annotations

import argparse
import json
import types

import numpy as np
import torch

import ditas
from ditas.diffusion.batches import generate
from ditas.diffusion.images import decode_to_uint8
from ditas.evaluation.digits import evaluate_digit_samples, load_classifier
from ditas.evaluation.metrics import psnr
from ditas.fileio import atomic_file


def add_eps_noise(model, level: float, seed: int) -> None:
    """Makes ``model.forward`` add N(0, level^2) to its epsilon channels (an instance override, so
    ``forward_with_cfg``, which calls ``self.forward``, sees it too)."""
    plain = type(model).forward
    channels = model.config.in_channels
    g = torch.Generator().manual_seed(seed)

    def forward(self, x, t, y):
        out = plain(self, x, t, y)
        noise = torch.randn(out[:, :channels].shape, generator=g) * level
        return torch.cat([out[:, :channels] + noise, out[:, channels:]], dim=1)

    model.forward = types.MethodType(forward, model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=float, nargs="+", default=[0.05, 0.09])
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()

    classifier = load_classifier()
    labels = np.arange(args.num) % 10
    kw = dict(steps=args.steps, cfg_scale=args.cfg, seed=args.seed, batch_size=args.batch_size, progress=False)
    fp = ditas.load_dit()
    fp_images = decode_to_uint8(fp, generate(fp, labels, **kw))
    rows = {"fp": evaluate_digit_samples(fp_images, labels, classifier=classifier)}
    for level in args.levels:
        model = ditas.load_dit()
        add_eps_noise(model, level, seed=args.seed + 7)
        images = decode_to_uint8(model, generate(model, labels, **kw))
        row = evaluate_digit_samples(images, labels, classifier=classifier, other=fp_images)
        row["psnr_vs_fp_db"] = psnr(images, fp_images)
        rows[f"fp + eps noise {level:g}"] = row
    print(f"{'model':<24} {'acc':>6} {'FID':>7} {'FID vs FP':>9} {'prec':>6} {'recall':>6} {'PSNR':>6}")
    for name, r in rows.items():
        print(f"{name:<24} {r['class_accuracy']:>6.3f} {r['fid']:>7.2f} {r.get('fid_vs_other', 0.0):>9.2f} "
              f"{r['precision']:>6.3f} {r['recall']:>6.3f} {r.get('psnr_vs_fp_db', float('nan')):>6.2f}")
    if args.json:
        keep = ("class_accuracy", "fid", "fid_vs_other", "precision", "recall", "psnr_vs_fp_db")
        out = {"num": args.num, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
               "rows": {n: {k: r[k] for k in keep if k in r} for n, r in rows.items()}}
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
