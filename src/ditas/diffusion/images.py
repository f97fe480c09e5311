"""From labels to images: generation (through ``batches``, the one batch loop), decoding and image files.

Reproducibility: sample ``i``'s start and step noise depend only on (seed, i) (see ``run.py``),
so the same seed gives the same samples whatever the batch size; two models sampled with the
same seed and labels see exactly the same noise (what ``ditas compare`` needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DitasError
from ..fileio import atomic_file
from .run import start_noise

__all__ = ["check_labels", "start_noise", "decode_to_uint8", "make_grid", "save_png", "save_npz"]

VAE_SCALE = 0.18215  # latent scaling of the Stable Diffusion VAE used by DiT (when the VAE config has none)


def check_labels(model: nn.Module, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise DitasError("no class labels given")
    bad = labels[(labels < 0) | (labels >= model.num_classes)]
    if bad.numel():
        raise DitasError(f"class label {int(bad[0])} is out of range: this model has classes "
                         f"0..{model.num_classes - 1}")
    return labels


def vae_scaling_factor(vae) -> float:
    """The latent scale from the VAE's own config (``scaling_factor``), else DiT's 0.18215."""
    value = getattr(getattr(vae, "config", None), "scaling_factor", None)
    return float(value) if value else VAE_SCALE


def decode_to_uint8(model: nn.Module, samples: torch.Tensor, vae=None, batch_size: int = 16) -> np.ndarray:
    """Model-space samples -> uint8 NHWC RGB images (grey images replicated to 3 channels)."""
    if model.config.space == "latent":
        if vae is None:
            raise DitasError("this model works in a VAE latent space: give --vae PATH "
                             "(a local diffusers AutoencoderKL folder)")
        scale = vae_scaling_factor(vae)
        imgs = []
        with torch.no_grad():
            for i in range(0, len(samples), batch_size):
                imgs.append(vae.decode(samples[i:i + batch_size] / scale).sample.float())
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
