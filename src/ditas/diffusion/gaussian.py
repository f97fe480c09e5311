"""Gaussian diffusion as in the published DiT/ADM code: schedule, respacing, posterior, losses.

All schedule arrays are float64 numpy arrays, indexed with respaced timestep indices and cast to
float32 after indexing, exactly as the reference does; that matters for reproducing its samples to
1e-4. ``SpacedDiffusion`` keeps the map from respaced index to original timestep, which is what
the model is called with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

VARIANCE_TYPES = ("learned_range", "fixed_large", "fixed_small")


def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """The linear schedule of DDPM, scaled so that it works for any number of steps."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Which original timesteps a respaced process keeps (ADM's ``space_timesteps``).

    ``"50"`` keeps 50 evenly strided steps; ``"ddim50"`` uses the DDIM integer stride; a list
    splits the process into equal sections with that many steps each.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken = []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return set(all_steps)


def _extract(arr: np.ndarray, timesteps: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(shape):
        res = res[..., None]
    return res.expand(shape)


@dataclass
class ModelPrediction:
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process with epsilon prediction."""

    def __init__(self, betas: np.ndarray, variance_type: str = "learned_range",
                 timestep_map: list[int] | None = None):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must lie in (0, 1]"
        self.variance_type = variance_type
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # -- the model's timestep for a respaced index -------------------------------------------
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]

    # -- forward process ----------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        var = _extract(self.posterior_variance, t, x_t.shape)
        log_var = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, var, log_var

    # -- reverse process ----------------------------------------------------------------------
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> ModelPrediction:
        """Mean and variance of p(x_{t-1} | x_t) from a raw model output at respaced index t."""
        C = x.shape[1]
        if self.variance_type == "learned_range":
            assert model_output.shape[1] == 2 * C, "a learned-variance model outputs 2x the input channels"
            model_output, var_values = torch.split(model_output, C, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            model_output = model_output[:, :C]
            if self.variance_type == "fixed_large":
                var_arr = np.append(self.posterior_variance[1], self.betas[1:])
                log_arr = np.log(var_arr)
            else:
                var_arr, log_arr = self.posterior_variance, self.posterior_log_variance_clipped
            variance = _extract(var_arr, t, x.shape)
            log_variance = _extract(log_arr, t, x.shape)
        pred_xstart = self.predict_xstart_from_eps(x, t, model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_xstart, x, t)
        return ModelPrediction(mean, variance, log_variance, pred_xstart)

    # -- training loss ------------------------------------------------------------------------
    def training_losses(self, model_fn, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DiT's loss: epsilon MSE, plus the variational bound term when the variance is learned.

        ``model_fn(x_t, model_t)`` gets the original-process timestep. The VB term sees a detached
        mean so that it only trains the variance (the "hybrid" loss of improved DDPM).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model_fn(x_t, self.model_timesteps(t))
        C = x_start.shape[1]
        eps = out[:, :C]
        terms = {"mse": ((noise - eps) ** 2).mean(dim=list(range(1, x_start.ndim)))}
        if self.variance_type == "learned_range":
            frozen = torch.cat([eps.detach(), out[:, C:]], dim=1)
            terms["vb"] = self._vb_term(frozen, x_start, x_t, t) * self.num_timesteps / 1000.0
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _vb_term(self, model_output, x_start, x_t, t) -> torch.Tensor:
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        pred = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, pred.mean, pred.log_variance)
        kl = kl.mean(dim=list(range(1, kl.ndim))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, pred.mean, 0.5 * pred.log_variance)
        nll = nll.mean(dim=list(range(1, nll.ndim))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 8 bits, under a Gaussian."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def create_diffusion(num_steps: int | str, learn_sigma: bool = True, num_timesteps: int = 1000,
                     fixed_variance: str = "fixed_large") -> GaussianDiffusion:
    """The 1000-step linear-schedule diffusion respaced to ``num_steps`` (an int, or "ddimN")."""
    if isinstance(num_steps, int) and num_steps < 2:
        raise ValueError(f"the number of sampling steps must be at least 2 (one step keeps only t = 0, "
                         f"where there is nothing to denoise), got {num_steps}")
    if isinstance(num_steps, int) and num_steps > num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} timesteps to {num_steps} steps")
    base = linear_beta_schedule(num_timesteps)
    use = space_timesteps(num_timesteps, str(num_steps))
    alphas_cumprod = np.cumprod(1.0 - base)
    last = 1.0
    new_betas, timestep_map = [], []
    for i, ac in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1 - ac / last)
            last = ac
            timestep_map.append(i)
    variance_type = "learned_range" if learn_sigma else fixed_variance
    return GaussianDiffusion(np.array(new_betas), variance_type, timestep_map)
