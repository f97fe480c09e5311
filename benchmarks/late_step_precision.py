"""Diagnostic for issue 23: ``ditas_w4a4`` sampled with 8-bit per-token activations at the last steps only.

    OMP_NUM_THREADS=2 python benchmarks/late_step_precision.py --below 100

Quantizes the embedded default model with ``ditas_w4a4`` (INT4 per-token activations), then
samples 500 images (labels i % 10, cfg 1.5, 50 DDPM steps, seed 0: the seeds of ``ditas compare``'s
tables) with every ``QuantLinear``'s activations switched to 8 bits per token at the steps whose
timestep is below ``--below`` (the weights and the LoRA branch unchanged), and scores them as
``ditas compare`` does (PSNR vs FP, class accuracy, domain FID, domain FID vs FP). The switch is
made by wrapping the model's guided call, not a ditas feature: it tests whether the W4A4 error
that moves the sample distribution lies at the lowest noise levels (``eps_by_step.py``).
"""

from __future__ import annotations

import argparse

import torch

import ditas
from ditas.diffusion.batches import sample_images
from ditas.diffusion.run import SamplingSettings
from ditas.evaluation.digits import evaluate_digit_samples
from ditas.evaluation.metrics import psnr
from ditas.quantization.apply import quantize
from ditas.quantization.config import ActivationFormat
from ditas.quantization.linear import QuantLinear
from ditas.quantization.recipes import recipe_config


def switch_late_steps(model, below: int, late: ActivationFormat) -> dict:
    """Wraps ``model.forward_with_cfg`` so that calls at timesteps below ``below`` run every
    ``QuantLinear`` with activations in ``late``; returns the call counts (``late``, ``all``)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    own = [m.activation_format for m in layers]
    inner = model.forward_with_cfg
    calls = {"late": 0, "all": 0}

    def forward_with_cfg(x, t, *args, **kwargs):
        is_late = int(t[0]) < below
        calls["all"] += 1
        calls["late"] += is_late
        for m, fmt in zip(layers, own):
            m.activation_format = late if is_late else fmt
        return inner(x, t, *args, **kwargs)

    model.forward_with_cfg = forward_with_cfg
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--below", type=int, default=100, help="timesteps below this run at 8-bit activations")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=250)
    args = p.parse_args()
    fp = ditas.load_dit(None)
    labels = torch.arange(args.num) % fp.num_classes
    settings = SamplingSettings(steps=50, cfg_scale=1.5, seed=0)
    fp_images = sample_images(fp, labels, settings, args.batch_size, progress=False)
    q, _ = quantize(fp, recipe_config("ditas_w4a4"), progress=False)
    calls = switch_late_steps(q, args.below, ActivationFormat(8, "token"))
    images = sample_images(q, labels, settings, args.batch_size, progress=False)
    d = evaluate_digit_samples(images, labels.numpy(), other=fp_images)
    print(f"ditas_w4a4, A8 below t={args.below} ({calls['late']} of {calls['all']} model calls): "
          f"PSNR vs FP {psnr(images, fp_images):.2f} dB, class accuracy {d['class_accuracy']:.3f}, "
          f"domain FID {d['fid']:.2f}, domain FID vs FP {d['fid_vs_other']:.2f}")


if __name__ == "__main__":
    main()
