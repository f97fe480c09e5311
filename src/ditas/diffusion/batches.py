"""The one loop that cuts a sampling run into batches and processes.

Every sampler of many images (``batches.generate``, ``sharded.sample_npz`` behind ``ditas sample``
and ``ditas benchmark``, ``evaluation.comparison`` behind ``ditas compare``, ``ditas.sample``)
goes through this module, so the split is written once:

- :func:`shares`: the samples ``0 .. n-1`` are cut into blocks of ``size`` consecutive indices;
  process ``rank`` of ``world`` owns the blocks ``k`` with ``k % world == rank``.
- :func:`batch_ranges`: a block ``start .. stop`` is cut into batches of ``batch_size`` counted
  from ``start``.
- :func:`model_batches` / :func:`sample_indices`: each batch is one ``run.sample_batch`` call
  (sample ``i`` gets the noise of (seed, i)), yielded as model-space samples or uint8 images.

Where the batches are cut matters: a quantized model with per-tensor activation scales shares one
scale per batch, so its images depend on which samples share a batch. Blocks are multiples of the
batch size (``sample_npz``'s default shard size, ``compare``'s blocks of one batch), so the batches
start at the same indices whatever the number of processes.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_gather_object, process_group
from ..errors import DitasError
from .images import check_labels, decode_to_uint8
from .run import SamplingSettings, sample_batch


def shares(n: int, size: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """The blocks (start, stop) of ``size`` consecutive indices of ``0 .. n-1`` that process
    ``rank`` of ``world`` samples: block ``k`` goes to process ``k % world``."""
    if size < 1:
        raise DitasError(f"the block size must be at least 1, got {size}")
    return [(s, min(n, s + size)) for k, s in enumerate(range(0, n, size)) if k % world == rank]


def batch_ranges(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """The batches (lo, hi) of ``start .. stop``, ``batch_size`` samples each counted from ``start``."""
    if batch_size < 1:
        raise DitasError(f"batch size must be at least 1, got {batch_size}")
    return [(lo, min(stop, lo + batch_size)) for lo in range(start, stop, batch_size)]


def model_batches(model: nn.Module, labels: torch.Tensor, settings: SamplingSettings, batch_size: int,
                  indices: range, *, z: torch.Tensor | None = None,
                  on_step: Callable[[], None] | None = None) -> Iterator[tuple[range, torch.Tensor]]:
    """(sample indices, model-space samples) per batch of ``indices`` (a range; ``labels[j]`` and
    ``z[j]`` belong to sample ``indices[j]``). The samples are on the model's device."""
    if len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} sample indices")
    first = indices.start
    for lo, hi in batch_ranges(indices.start, indices.stop, batch_size):
        j, k = lo - first, hi - first
        x = sample_batch(model, labels[j:k], settings, range(lo, hi), z=None if z is None else z[j:k],
                         on_step=on_step)
        yield range(lo, hi), x


def sample_indices(model: nn.Module, labels: torch.Tensor, settings: SamplingSettings, batch_size: int,
                   indices: range, vae=None) -> Iterator[tuple[range, np.ndarray]]:
    """(sample indices, uint8 NHWC images) per batch of ``indices``, decoded batch by batch (by
    ``vae`` for latent models): memory bounded by the batch."""

    for rows, x in model_batches(model, labels, settings, batch_size, indices):
        yield rows, decode_to_uint8(model, x, vae)


def sample_images(model: nn.Module, labels: Sequence[int] | torch.Tensor, settings: SamplingSettings,
                  batch_size: int = 64, vae=None, progress: bool = True) -> np.ndarray:
    """All samples' uint8 images (N, H, W, 3), on every process. Under ``torchrun`` each process
    samples its :func:`shares` of one batch each and the images are gathered: the same bytes as
    one process (sample i's noise depends only on (seed, i), the batches start at the same
    indices)."""

    labels = check_labels(model, labels)
    rank, world = process_group()
    own = shares(labels.numel(), batch_size, rank, world)
    mine = []
    desc = f"sampling (rank {rank}/{world})" if world > 1 else "sampling"
    with tqdm(total=sum(b - a for a, b in own), desc=desc, unit="img", disable=not progress or rank != 0,
              leave=False) as bar:
        for start, stop in own:
            for rows, imgs in sample_indices(model, labels[start:stop], settings, batch_size, range(start, stop), vae):
                mine.append((rows.start, imgs))
                bar.update(len(rows))
    if world == 1:
        parts = mine
    else:
        parts = sorted((lo, imgs) for part in all_gather_object(mine) for lo, imgs in part)
    return np.concatenate([imgs for _, imgs in parts])


def generate(model: nn.Module, labels: Sequence[int] | torch.Tensor, steps: int = 50,
             cfg_scale: float | None = 4.0, sampler: str = "ddpm", eta: float = 0.0, seed: int = 0,
             batch_size: int = 64, guide_channels: int | None = 3, progress: bool = True,
             z: torch.Tensor | None = None, first_index: int = 0) -> torch.Tensor:
    """Samples one image (latent or pixel tensor, model space) per label; returns (N, C, H, W).

    Label ``j`` is sample ``first_index + j`` of the run (its noise comes from (seed, index)).
    ``z`` (N, C, H, W) replaces the start noise. The result is on the model's device.
    """
    labels = check_labels(model, labels)
    settings = SamplingSettings(steps=steps, cfg_scale=cfg_scale, sampler=sampler, eta=eta, seed=seed,
                                guide_channels=guide_channels)
    n = labels.numel()
    n_batches = len(batch_ranges(0, n, batch_size))  # a batch size below 1 fails here, before sampling
    with tqdm(total=n_batches * steps, desc="sampling", unit="step", disable=not progress, leave=False) as bar:
        outs = [x for _, x in model_batches(model, labels, settings, batch_size, range(first_index, first_index + n),
                                            z=z, on_step=lambda: bar.update(1))]
    return torch.cat(outs, dim=0)
