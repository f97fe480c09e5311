"""The Diffusion Transformer (DiT, Peebles & Xie), state-dict compatible with the published code.

One readable file, as in the original ``models.py``: the embedders, the adaLN-Zero block, the
final layer, the model, its configuration and the registry of published sizes. Parameter names
match the published checkpoints exactly (``blocks.N.attn.qkv.weight``, ...), so a published
state dict loads with ``load_state_dict(strict=True)``.

The four linear layers of every block (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``)
are plain ``nn.Linear`` modules that the quantizer replaces in place; nothing in the forward pass
assumes they are ``nn.Linear``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError


# ----------------------------------------------------------------------------------------------
#                                        Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    """Constructor arguments of a DiT; ``space`` says whether it denoises VAE latents or pixels."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    space: str = ""  # "latent" or "pixel"; empty: latent iff in_channels == 4
    # Variants seen in converted checkpoints (diffusers' DiTTransformer2DModel): LayerNorm eps of
    # the blocks, and the frequency shift of the timestep features (0: DiT, 1: diffusers).
    norm_eps: float = 1e-6
    timestep_freq_shift: int = 0

    def __post_init__(self) -> None:
        if not self.space:
            self.space = "latent" if self.in_channels == 4 else "pixel"
        problems = []
        for name, most in (("input_size", 1 << 14), ("patch_size", 1 << 10), ("in_channels", 1 << 12),
                           ("hidden_size", 1 << 16), ("depth", 1 << 10), ("num_heads", 1 << 12),
                           ("num_classes", 1 << 24)):  # upper bounds: far above any DiT, below a hang
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                problems.append(f"{name} must be an integer in 1..{most}, got {value!r}")
        for name, lo, hi in (("mlp_ratio", 0.0, 64.0), ("norm_eps", 0.0, 1.0), ("class_dropout_prob", 0.0, 1.0)):
            value = getattr(self, name)  # a zero eps or a zero MLP breaks the model; dropout may be 0
            ok_lo = (lambda v: v >= lo) if name == "class_dropout_prob" else (lambda v: v > lo)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (ok_lo(value) and value < hi):
                problems.append(f"{name} must be a number {'>=' if name == 'class_dropout_prob' else '>'} {lo:g} "
                                f"and < {hi:g}, got {value!r}")
        if not isinstance(self.learn_sigma, bool):
            problems.append(f"learn_sigma must be true or false, got {self.learn_sigma!r}")
        if self.timestep_freq_shift not in (0, 1) or isinstance(self.timestep_freq_shift, bool):
            problems.append(f"timestep_freq_shift must be 0 or 1, got {self.timestep_freq_shift!r}")
        if problems:
            raise ConfigError("invalid DiT config: " + "; ".join(problems))
        if self.input_size % self.patch_size:
            raise ConfigError(f"invalid DiT config: input_size {self.input_size} is not a multiple "
                             f"of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"invalid DiT config: hidden_size {self.hidden_size} is not a multiple "
                             f"of num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ConfigError("invalid DiT config: hidden_size must be a multiple of 4 "
                             "(2-D sin-cos position embedding)")
        if self.space not in ("latent", "pixel"):
            raise ConfigError(f"invalid DiT config: space must be 'latent' or 'pixel', got {self.space!r}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiT config keys: {unknown}")
        return cls(**data)


# ----------------------------------------------------------------------------------------------
#                            Embedding layers for timesteps and class labels
# ----------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _in_place_ok(out: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether an in-place update of ``out`` gives what the out-of-place expression gives: same
    result dtype, and no autograd graph to keep (training uses the out-of-place form). Under
    torch.compile the out-of-place form (dynamo cannot trace ``torch.result_type``; inductor fuses
    the expression and reuses buffers itself)."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, *others)):
        return False
    return all(torch.result_type(out, t) == out.dtype for t in others)


def modulate_(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``modulate`` in place on ``x`` (a fresh LayerNorm output the caller owns): bit-identical,
    two fewer full-size temporaries (on the CPU each costs more in allocation than in arithmetic)."""
    if not _in_place_ok(x, shift, scale):
        return modulate(x, shift, scale)
    return x.mul_(1 + scale.unsqueeze(1)).add_(shift.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate.unsqueeze(1) * y`` with one temporary instead of two; bit-identical (``+`` commutes)."""
    out = gate.unsqueeze(1) * y
    if not _in_place_ok(out, x):
        return x + out
    return out.add_(x)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors (sinusoidal features, then a 2-layer MLP)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, freq_shift: int = 0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / (half - freq_shift)
        ).to(device=t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; label ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Image to patch tokens (a strided convolution), as timm's ``PatchEmbed``."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
#                                      Core DiT blocks
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (rows: q, then k, then v).

    ``core`` is the attention itself, ``softmax(q k^T / sqrt(d)) v``: None (the default) is
    ``F.scaled_dot_product_attention``; ``ditas.quantization.attention.use_attention`` puts a
    lower-precision ``AttentionCore`` there (no parameters: the state dict does not change).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, "hidden size must divide evenly into heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.core: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v) if self.core is None else self.core(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = gated_residual(x, gate_msa, self.attn(modulate_(self.norm1(x), shift_msa, scale_msa)))
        x = gated_residual(x, gate_mlp, self.mlp(modulate_(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN modulation then a linear map to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate_(self.norm_final(x), shift, scale)
        return self.linear(x)


# ----------------------------------------------------------------------------------------------
#                                          The model
# ----------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""

    def __init__(self, config: DiTConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = DiTConfig(**kwargs)
        elif kwargs:
            raise TypeError("give either a DiTConfig or keyword arguments, not both")
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size, freq_shift=config.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Fixed sin-cos embedding; a parameter (not a buffer) so that it is in the state dict,
        # exactly as in the published checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio, config.norm_eps)
             for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The published initialisation (adaLN-Zero: modulation and output layers start at zero)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = int(self.config.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.config.hidden_size, grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, patch_size**2 * C) -> (N, C, H, W)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], "token count must be a square"
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens entering the first block and the conditioning vector ``c = t_emb + y_emb``, in the
        model's compute dtype (its patch embedding's: fp32, bf16 or fp16; the input is cast to it)."""
        tokens = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        return tokens, c

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer and unpatchify: tokens after the last block -> model output image."""
        return self.unpatchify(self.final_layer(tokens, c))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) inputs; t: (N,) diffusion timesteps; y: (N,) class labels. The model
        computes in its own dtype; the output has ``x``'s dtype (a sampler keeps fp32 latents)."""
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.head(tokens, c).to(x.dtype)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int | None = 3) -> torch.Tensor:
        """Classifier-free guidance: the batch is [cond half; uncond half] of the same inputs.

        As in the published code, guidance applies to the first ``guide_channels`` output
        channels (3 by default, a quirk every published FID was measured with); ``None`` guides
        all channels. The other channels (for instance the learned variance) pass through.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        n = model_out.shape[1] if guide_channels is None else guide_channels
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def extra_repr(self) -> str:
        c = self.config
        return (f"depth={c.depth}, hidden={c.hidden_size}, heads={c.num_heads}, patch={c.patch_size}, "
                f"input={c.input_size}x{c.input_size}x{c.in_channels} ({c.space}), classes={c.num_classes}")


# ----------------------------------------------------------------------------------------------
#                                  Sine/cosine positional embedding
# ----------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Returns a (grid_size*grid_size, embed_dim) array, as in the published code."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos_from_grid(embed_dim // 2, grid[0])
    emb_w = _1d_sincos_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    assert embed_dim % 2 == 0, "sin-cos embedding needs an even width"
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ----------------------------------------------------------------------------------------------
#                                     DiT configurations
# ----------------------------------------------------------------------------------------------

_SIZES = {  # name -> (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}

DiT_models: dict[str, Any] = {}


def _register(size: str, patch: int) -> None:
    depth, hidden, heads = _SIZES[size]

    def factory(**kwargs: Any) -> DiT:
        return DiT(DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs))

    factory.__name__ = f"DiT_{size}_{patch}"
    factory.__doc__ = f"DiT-{size}/{patch}: depth {depth}, hidden {hidden}, {heads} heads, patch {patch}."
    DiT_models[f"DiT-{size}/{patch}"] = factory


for _size in _SIZES:
    for _patch in (2, 4, 8):
        _register(_size, _patch)


class UnknownModelError(ConfigError, KeyError):
    """An unknown model name: a ``ConfigError`` (one line on the command line) that is still the
    ``KeyError`` earlier versions raised, so callers catching that keep working."""

    __str__ = ConfigError.__str__  # KeyError would quote the message


def dit_config(name: str, **overrides: Any) -> DiTConfig:
    """The configuration of a registered model, e.g. ``dit_config("DiT-XL/2", input_size=64)``."""
    if not isinstance(name, str) or name not in DiT_models:
        raise UnknownModelError(f"unknown DiT model {name!r:.60}; known: {', '.join(DiT_models)}")
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden, heads = _SIZES[size]
    return DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch), **overrides)

