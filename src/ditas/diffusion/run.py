"""The one sampling run: per-sample noise, guidance batch, the step loop.

Every place that samples from a DiT (``batches.generate``, calibration's FP trajectory, the eps
metrics of ``ditas compare``, the multi-process split of ``sharded.sample_npz``) goes through
:func:`sampling_run`, so they all see the same noise for the same (seed, sample index).

Per-sample randomness: sample ``i`` owns one CPU ``torch.Generator`` seeded from ``(seed, i)``
(through numpy's ``SeedSequence``, so neighbouring seeds and indices give unrelated streams). It
draws the start noise first, then one step noise per sampling step, in order. The noise is drawn
on the CPU and moved to the model's device afterwards. A sample's noise therefore depends only on
(seed, i): not on the batch size, on which process samples it, nor on the device. With
classifier-free guidance the batch is [samples; the same samples with the null label] and both
halves get the same noise (only the first half's output is used, as in the published code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DitasError
from ..validate import FiniteGuard, check_sampling_options
from .gaussian import create_diffusion
from .samplers import SAMPLERS, ModelFn, guided_model_fn, sample_steps


@dataclass(frozen=True)
class SamplingSettings:
    """What decides a sample besides the model, its label and its index."""

    steps: int = 50
    cfg_scale: float | None = 4.0
    sampler: str = "ddpm"
    eta: float = 0.0
    seed: int = 0
    guide_channels: int | None = 3

    def __post_init__(self) -> None:
        check_sampling_options(steps=self.steps, cfg_scale=self.cfg_scale, eta=self.eta, seed=self.seed)
        if self.sampler not in SAMPLERS:
            raise DitasError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale is not None and self.cfg_scale > 1.0


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit generator seed of sample ``index`` in a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0])


class SampleNoise:
    """One CPU generator per sample; ``start()`` then ``step()`` per step, each (B, C, H, W)."""

    def __init__(self, shape: tuple[int, ...], seed: int, indices: Sequence[int]):
        self.shape = tuple(shape)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]

    def _draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])

    def start(self) -> torch.Tensor:
        return self._draw()

    def step(self) -> torch.Tensor:
        return self._draw()


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def latent_shape(model: nn.Module) -> tuple[int, int, int]:
    c = model.config
    return (c.in_channels, c.input_size, c.input_size)


def start_noise(model: nn.Module, n: int, seed: int, start: int = 0) -> torch.Tensor:
    """The start noise of samples ``start .. start + n - 1`` (CPU), as :func:`sampling_run` draws it."""
    return SampleNoise(latent_shape(model), seed, range(start, start + n)).start()


# Small matrix products round differently from large ones: on this CPU (oneDNN/MKL sgemm, 1-2
# threads) a row of ``x @ w.T`` is bit-identical for every row count M >= 12 but not for some
# M < 12 (the small-M kernels reduce in another order). The conditioning path of a DiT (timestep
# MLP, adaLN) multiplies one row per sample, so a batch of one sample (two rows with guidance)
# would round differently from a batch of 64. ``sample_batch`` therefore pads the model batch to
# at least MIN_MODEL_ROWS rows (copies of the first sample, dropped afterwards): batch size 1, 7
# and 64 then give byte-identical samples (tests/test_sampling_run.py).
MIN_MODEL_ROWS = 16


def sampling_run(model: nn.Module, labels: torch.Tensor, settings: SamplingSettings,
                 indices: Sequence[int] | None = None, z: torch.Tensor | None = None,
                 wrap: Callable[[ModelFn], ModelFn] | None = None,
                 min_rows: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Samples ``labels`` (sample ``indices[j]`` gets ``labels[j]``); yields (step, x) per step.

    ``x`` is the whole model batch (with guidance: both halves); its first ``len(labels)`` rows
    are the samples. ``z`` replaces the start noise (the step noise stays per sample); ``wrap``
    wraps the model function (recording, checks). ``min_rows`` pads the model batch with copies
    of the first sample up to that many rows (see MIN_MODEL_ROWS); the copies follow the samples.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = labels.numel()
    indices = list(range(n)) if indices is None else list(indices)
    if len(indices) != n:
        raise ValueError(f"{len(indices)} sample indices for {n} labels")
    device = model_device(model)
    diffusion = create_diffusion(settings.steps, learn_sigma=model.config.learn_sigma)
    noise = SampleNoise(latent_shape(model), settings.seed, indices)
    start = noise.start()
    if z is not None:
        if tuple(z.shape) != tuple(start.shape):
            raise ValueError(f"z must have shape {tuple(start.shape)}, got {tuple(z.shape)}")
        start = z.detach().to("cpu", torch.float32)
    copies = 2 if settings.guided else 1
    pad = max(0, -(-min_rows // copies) - n)
    if pad:
        labels = torch.cat([labels, labels[:1].repeat(pad)])
    model_fn, _ = guided_model_fn(model, labels.to(device), settings.cfg_scale, settings.guide_channels)
    if wrap is not None:
        model_fn = wrap(model_fn)

    def batch(t: torch.Tensor) -> torch.Tensor:
        if pad:
            t = torch.cat([t, t[:1].expand(pad, *t.shape[1:])])
        return torch.cat([t] * copies).to(device)

    def step_noise(i: int, shape: torch.Size) -> torch.Tensor:
        return batch(noise.step())

    yield from sample_steps(model_fn, diffusion, batch(start), sampler=settings.sampler, eta=settings.eta,
                            noise_fn=step_noise)


def sample_batch(model: nn.Module, labels: torch.Tensor, settings: SamplingSettings,
                 indices: Sequence[int] | None = None, z: torch.Tensor | None = None,
                 on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """The final samples (N, C, H, W) of one batch, on the model's device.

    A non-finite prediction stops the run with a DitasError naming the step and the layer
    (``validate.FiniteGuard``).
    """
    n = torch.as_tensor(labels).numel()
    x = None
    for _, x in sampling_run(model, labels, settings, indices, z, min_rows=MIN_MODEL_ROWS,
                             wrap=lambda fn: FiniteGuard(model, fn, settings.steps)):
        if on_step is not None:
            on_step()
    return x[:n]


# ----------------------------------------------------------------------------------------------
#                          The FP eps trajectory and the eps metric
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def eps_trajectory(model: nn.Module, labels: Sequence[int], settings: SamplingSettings
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x_t, t, guided eps) at every step of ``model``'s sampling run of ``labels``."""
    rec = []
    channels = model.config.in_channels

    def wrap(fn: ModelFn) -> ModelFn:
        def wrapped(x, t):
            out = fn(x, t)
            rec.append((x.clone(), t.clone(), out[:, :channels].clone()))
            return out
        return wrapped

    for _ in sampling_run(model, torch.as_tensor(labels), settings, wrap=wrap):
        pass
    return rec


@torch.no_grad()
def eps_mse(model: nn.Module, labels: Sequence[int], settings: SamplingSettings,
            trajectory: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """Mean squared error of ``model``'s guided eps along a recorded trajectory (of another model)."""
    device = model_device(model)
    y = torch.as_tensor(labels, dtype=torch.long).to(device)
    fn, _ = guided_model_fn(model, y, settings.cfg_scale, settings.guide_channels)
    c = model.config.in_channels
    errs = [float(((fn(x.to(device), t.to(device))[:, :c] - eps.to(device)) ** 2).mean()) for x, t, eps in trajectory]
    return float(np.mean(errs))
