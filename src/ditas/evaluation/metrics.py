"""Generic sample-quality metrics: Fréchet distance, k-NN precision/recall, PSNR.

They take plain arrays (features or images) and know nothing about digits or DiTs, so any
evaluator (domain features here, Inception features elsewhere) can share them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import linalg


def _as_features(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, features) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrt(S_a S_b))``. The matrix square root is scipy's;
    when it is singular or not finite (rank-deficient covariances, fewer samples than features)
    we retry with ``eps`` added to both diagonals, as the reference FID code does, and drop an
    imaginary part that is numerical noise.
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu_a - mu_b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean, _ = linalg.sqrtm(s_a.dot(s_b), disp=False)
        if not np.isfinite(covmean).all():
            offset = np.eye(s_a.shape[0]) * eps
            covmean = linalg.sqrtm((s_a + offset).dot(s_b + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(covmean.imag)) if covmean.size else 0.0
        scale = max(1.0, float(np.max(np.abs(covmean.real))))
        if imag > 1e-3 * scale:
            # large imaginary parts come from a badly conditioned product: regularise and retry
            offset = np.eye(s_a.shape[0]) * eps * scale
            covmean = linalg.sqrtm((s_a + offset).dot(s_b + offset))
        covmean = covmean.real
    value = float(diff.dot(diff) + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # tiny negative values are rounding error of identical sets


def _pairwise(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i:i + chunk], y) for i in range(0, len(x), chunk)], dim=0)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = _pairwise(x, x)
    return d.kthvalue(k + 1, dim=1).values  # value 1 is the point itself (distance 0)


def _in_manifold(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    d = _pairwise(points, centers)
    return (d <= radii[None, :]).any(dim=1)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Precision: the fraction of fake samples inside the real manifold (the union of balls around
    every real feature with radius its distance to its k-th nearest real neighbour). Recall: the
    fraction of real samples inside the fake manifold, built the same way.
    """
    r = torch.from_numpy(_as_features(real, "real"))
    f = torch.from_numpy(_as_features(fake, "fake"))
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature widths differ: {r.shape[1]} vs {f.shape[1]}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set "
                         f"(got {len(r)} real, {len(f)} fake)")
    precision = _in_manifold(f, r, _knn_radii(r, k)).double().mean().item()
    recall = _in_manifold(r, f, _knn_radii(f, k)).double().mean().item()
    return precision, recall


def psnr(a, b, max_val: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements of two same-shape arrays.

    ``10 log10(max_val^2 / MSE)``; identical inputs give ``inf``. Integer inputs are compared as
    float64 (no uint8 wrap-around).
    """
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if isinstance(b, torch.Tensor):
        b = b.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs arrays of the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("psnr of empty arrays is undefined")
    if max_val <= 0:
        raise ValueError(f"max_val must be positive, got {max_val}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(max_val ** 2 / mse)
