"""From labels to images: noise, guidance, the sampling loop, decoding and image files.

Reproducibility: the start noise of all N images is drawn first from ``seed``; batch ``b`` then
draws its per-step noise from a generator seeded with ``seed + 1 + b``. Two models sampled with
the same seed, labels and batch size therefore see exactly the same noise (what ``ditas compare``
needs), whatever they compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DitasError
from ..fileio import atomic_file
from ..validate import FiniteGuard, check_sampling_options
from .gaussian import create_diffusion
from .samplers import SAMPLERS, guided_model_fn, sample_steps

VAE_SCALE = 0.18215  # latent scaling of the Stable Diffusion VAE used by DiT


def check_labels(model: nn.Module, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise DitasError("no class labels given")
    bad = labels[(labels < 0) | (labels >= model.num_classes)]
    if bad.numel():
        raise DitasError(f"class label {int(bad[0])} is out of range: this model has classes "
                         f"0..{model.num_classes - 1}")
    return labels


def start_noise(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g)


def generate(model: nn.Module, labels: Sequence[int] | torch.Tensor, steps: int = 50,
             cfg_scale: float | None = 4.0, sampler: str = "ddpm", eta: float = 0.0, seed: int = 0,
             batch_size: int = 64, guide_channels: int | None = 3, progress: bool = True,
             z: torch.Tensor | None = None) -> torch.Tensor:
    """Samples one image (latent or pixel tensor, model space) per label; returns (N, C, H, W)."""
    labels = check_labels(model, labels)
    check_sampling_options(steps=steps, cfg_scale=cfg_scale, eta=eta, seed=seed)
    if sampler not in SAMPLERS:
        raise DitasError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if batch_size < 1:
        raise DitasError(f"batch size must be at least 1, got {batch_size}")
    diffusion = create_diffusion(steps, learn_sigma=model.config.learn_sigma)
    n = labels.numel()
    z_all = start_noise(model, n, seed) if z is None else z
    outs = []
    n_batches = (n + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * steps, desc="sampling", unit="step", disable=not progress, leave=False)
    for b in range(n_batches):
        y = labels[b * batch_size:(b + 1) * batch_size]
        zb = z_all[b * batch_size:(b + 1) * batch_size]
        model_fn, _ = guided_model_fn(model, y, cfg_scale, guide_channels)
        model_fn = FiniteGuard(model, model_fn, steps)  # a NaN stops the run, naming step and layer
        if cfg_scale is not None and cfg_scale > 1.0:
            zb = torch.cat([zb, zb], dim=0)
        g = torch.Generator().manual_seed(seed + 1 + b)
        x = zb
        for _, x in sample_steps(model_fn, diffusion, zb, sampler=sampler, eta=eta, generator=g):
            bar.update(1)
        outs.append(x[: y.numel()])
    bar.close()
    return torch.cat(outs, dim=0)


def decode_to_uint8(model: nn.Module, samples: torch.Tensor, vae=None, batch_size: int = 16) -> np.ndarray:
    """Model-space samples -> uint8 NHWC RGB images (grey images replicated to 3 channels)."""
    if model.config.space == "latent":
        if vae is None:
            raise DitasError("this model works in a VAE latent space: give --vae PATH "
                             "(a local diffusers AutoencoderKL folder)")
        imgs = []
        with torch.no_grad():
            for i in range(0, len(samples), batch_size):
                imgs.append(vae.decode(samples[i:i + batch_size] / VAE_SCALE).sample.float())
        x = torch.cat(imgs)
    else:
        x = samples
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] != 3:
        x = x[..., :3] if x.shape[-1] > 3 else np.concatenate([x, np.repeat(x[..., -1:], 3 - x.shape[-1], -1)], -1)
    return x


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """NHWC uint8 -> one HWC uint8 grid image."""
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(image: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def save_npz(images: np.ndarray, labels: np.ndarray, path: str | Path) -> None:
    """The ADM evaluator's layout: ``arr_0`` uint8 NHWC, plus int64 ``labels``."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images.astype(np.uint8), labels=np.asarray(labels, dtype=np.int64))
