"""FP against quantized recipes, sampled from the same noise and labels (``ditas compare``'s loop).

Every model samples the same labels through ``diffusion.run`` (sample i's noise from (seed, i)), so
the samples differ only by what quantization changed. Per recipe: PSNR of the uint8 samples
against the FP samples, the eps-prediction MSE along the FP model's own trajectory, and, given a
``domain`` evaluator, its metrics (class accuracy, FID, FID against the FP samples, precision,
recall). Recipes with the same calibration settings share one FP calibration run.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..diffusion.batches import sample_images
from ..diffusion.run import SamplingSettings, eps_mse, eps_trajectory, model_device
from ..distributed import process_group
from .metrics import psnr


def compare_recipes(model: nn.Module, configs: dict[str, object | None], labels: torch.Tensor,
                    settings: SamplingSettings, *, batch_size: int = 100, eps_samples: int = 32, vae=None,
                    domain: Callable | None = None, kernel: str = "auto", attention: str = "fp32",
                    progress: bool = True, on_row: Callable[[str, dict], None] | None = None) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Rows of metrics and the uint8 samples per recipe label (``None`` config: the FP model).

    ``configs`` maps a label (``"ditas@w4a8"``) to its ``QuantConfig``; ``on_row(label, row)`` is
    called as each row is done (the CLI prints it). Under ``torchrun`` every process must call this
    with the same arguments: process 0 records the calibration runs and quantizes every recipe,
    the others receive its models (``checkpoint.broadcast_quantized``: one model whatever each
    process's rounding), and every process samples its share (``diffusion.batches.sample_images``); process 0 returns the rows and
    images, the others empty dicts. ``attention`` is the attention core of the quantized models
    (``quantization.attention.use_attention``; the FP model keeps fp32); ``kernel`` that of their
    layers (``auto``: what ``ditas sample`` of a saved folder runs).
    """
    from ..quantization.apply import quantize, record
    from ..quantization.attention import check_attention_mode, use_attention
    from ..quantization.checkpoint import broadcast_quantized
    from ..quantization.kernels import canonical

    check_attention_mode(attention)  # before the FP run
    canonical(kernel)

    labels = torch.as_tensor(labels, dtype=torch.long)
    m_eps = min(eps_samples, labels.numel())
    eps_labels = labels[:m_eps].tolist()
    t0 = time.perf_counter()
    main = process_group()[0] == 0  # under torchrun every process samples; process 0 scores
    progress = progress and main
    fp_images = sample_images(model, labels, settings, batch_size, vae, progress)
    fp_time = time.perf_counter() - t0
    fp_traj = eps_trajectory(model, eps_labels, settings) if main else None
    rows: dict[str, dict] = {}
    images: dict[str, np.ndarray] = {}
    trajectories: dict = {}
    for label, cfg in configs.items():
        t1 = time.perf_counter()
        if cfg is None:
            row: dict = {"recipe": "fp", "psnr_db": None, "eps_mse": 0.0,  # PSNR of FP vs itself: infinite
                         "sample_time_s": round(fp_time, 1)}
            imgs = fp_images
        else:
            row = {"recipe": cfg.recipe}
            qmodel = rep = None
            if main:  # quantized once, on process 0, and sent to the others: one model for every image
                key = cfg.calibration_key()
                if key not in trajectories:
                    trajectories[key] = record(model, cfg, progress)
                qmodel, rep = quantize(model, cfg, trajectory=trajectories[key], progress=progress, kernel=kernel)
            qmodel = broadcast_quantized(qmodel, kernel=kernel, device=model_device(model))
            if attention != "fp32":
                use_attention(qmodel, attention)
                row["attention"] = attention
            if main:
                row.update(w_bits=cfg.weights.bits, a_bits=cfg.activations.bits, mean_rel_output_error=rep["mean_rel_output_error"],
                           quantize_time_s=round(time.perf_counter() - t1, 1),
                           alphas={n: v["alpha"] for n, v in rep["layers"].items()})
            t2 = time.perf_counter()
            imgs = sample_images(qmodel, labels, settings, batch_size, vae, progress)
            row["sample_time_s"] = round(time.perf_counter() - t2, 1)
            if not main:
                del qmodel
                continue
            p = float(psnr(imgs, fp_images))
            row["psnr_db"] = p if np.isfinite(p) else None  # identical images (strict JSON has no inf)
            row["eps_mse"] = eps_mse(qmodel, eps_labels, settings, fp_traj)
            del qmodel
        if not main:
            continue
        if domain is not None:
            d = domain(imgs, labels.numpy(), other=None if cfg is None else fp_images)
            row.update(class_accuracy=d["class_accuracy"], fid=d["fid"], precision=d["precision"], recall=d["recall"],
                       fid_vs_fp=0.0 if cfg is None else d["fid_vs_other"])
        rows[label] = row
        images[label] = imgs
        if on_row is not None:
            on_row(label, row)
    return rows, images
