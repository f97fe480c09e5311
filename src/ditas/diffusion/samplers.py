"""Sampling loops (ancestral DDPM and DDIM) and classifier-free guidance, as the published code.

``sample_loop`` works on a raw model function and the full batch (with guidance: the
[cond half; uncond half] batch, as the reference); ``run.sampling_run`` builds labels, per-sample
noise and guidance for a DiT and is what the rest of ditas calls.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from .gaussian import GaussianDiffusion, _extract

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim")


def guided_model_fn(model: nn.Module, y: torch.Tensor, cfg_scale: float | None,
                    guide_channels: int | None = 3) -> tuple[ModelFn, torch.Tensor]:
    """The model function for labels ``y`` (one per image), and the label batch it runs on.

    With ``cfg_scale`` above 1 the batch is doubled: [labels; null labels], and the model is
    called through ``forward_with_cfg``. Returns (model_fn, full label batch).
    """
    if cfg_scale is not None and cfg_scale > 1.0:
        y_null = torch.full_like(y, model.num_classes)
        y_full = torch.cat([y, y_null], dim=0)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.forward_with_cfg(x, t, y_full, cfg_scale, guide_channels=guide_channels)
    else:
        y_full = y

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, y_full)
    return fn, y_full


def sample_steps(model_fn: ModelFn, diffusion: GaussianDiffusion, z: torch.Tensor, sampler: str = "ddpm",
                 eta: float = 0.0, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 clip_denoised: bool = False,
                 noise_fn: Callable[[int, torch.Size], torch.Tensor] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (step index, x after the step) for every step, first step (highest t) first.

    ``noise[i]`` (if given) is the Gaussian noise drawn at step ``i``; else ``noise_fn(i, shape)``
    (if given; ``run.sampling_run`` passes per-sample noise this way); otherwise it is drawn from
    ``generator``. The last step draws noise too and masks it, as the reference does.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    n_steps = diffusion.num_timesteps
    if noise is not None and (noise.shape[0] < n_steps or tuple(noise.shape[1:]) != tuple(z.shape)):
        raise ValueError(f"injected noise must have shape ({n_steps}, *{tuple(z.shape)}), got {tuple(noise.shape)}")
    x = z
    for i, index in enumerate(reversed(range(n_steps))):
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        with torch.no_grad():
            out = model_fn(x, diffusion.model_timesteps(t))
            pred = diffusion.p_mean_variance(out, x, t, clip_denoised=clip_denoised)
        if noise is not None:
            step_noise = noise[i]
        elif noise_fn is not None:
            step_noise = noise_fn(i, x.shape)
        else:
            step_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if sampler == "ddpm":
            x = pred.mean + nonzero * torch.exp(0.5 * pred.log_variance) * step_noise
        else:
            eps = diffusion.predict_eps_from_xstart(x, t, pred.pred_xstart)
            ab = _extract(diffusion.alphas_cumprod, t, x.shape)
            ab_prev = _extract(diffusion.alphas_cumprod_prev, t, x.shape)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            mean_pred = pred.pred_xstart * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
            x = mean_pred + nonzero * sigma * step_noise
        yield i, x


def sample_loop(model_fn: ModelFn, diffusion: GaussianDiffusion, z: torch.Tensor, **kwargs) -> torch.Tensor:
    """Runs every step of ``sample_steps`` and returns the final sample."""
    x = z
    for _, x in sample_steps(model_fn, diffusion, z, **kwargs):
        pass
    return x
