"""Converting a diffusers ``DiTTransformer2DModel`` folder to the published DiT layout.

diffusers stores q, k and v separately, keeps a copy of the timestep and label embedders in every
block, computes the position embedding on the fly, uses LayerNorm eps from its config (1e-5 by
default) in the blocks and a frequency shift of 1 in its timestep features. The conversion undoes
the layout and records the two numeric variants in ``DiTConfig`` so the converted model computes
what diffusers' model computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..validate import is_int
from .dit import DiTConfig, get_2d_sincos_pos_embed
from .state_files import read_pt, read_safetensors


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = sorted(folder.glob("*.safetensors"))
    if st:
        state: dict[str, torch.Tensor] = {}
        for f in st:
            state.update(read_safetensors(f)[0])
        return state
    bins = sorted(folder.glob("*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(read_pt(f))
        return state
    raise CheckpointError(f"{folder}: no *.safetensors or *.bin weights next to config.json")


def diffusers_config_to_dit(cfg: dict[str, Any], source: str) -> DiTConfig:
    unsupported = []
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        unsupported.append(f"norm_type={cfg.get('norm_type')}")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        unsupported.append(f"activation_fn={cfg.get('activation_fn')}")
    if cfg.get("norm_elementwise_affine", False):
        unsupported.append("norm_elementwise_affine=True")
    if not cfg.get("attention_bias", True):
        unsupported.append("attention_bias=False")
    if cfg.get("num_embeds_ada_norm") is None:
        unsupported.append("no class conditioning (num_embeds_ada_norm is null)")
    if unsupported:
        raise CheckpointError(f"{source}: unsupported diffusers DiT variant: {', '.join(unsupported)}")
    def integer(key: str, default: int | None) -> int:
        value = cfg.get(key, default)
        if not is_int(value):
            raise CheckpointError(f"{source}: {key} must be an integer, got {value!r}")
        return value

    heads = integer("num_attention_heads", 16)
    hidden = heads * integer("attention_head_dim", 72)
    in_ch = integer("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    if not is_int(out_ch) or out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{source}: out_channels {out_ch!r} is neither in_channels nor twice it")
    eps = cfg.get("norm_eps", 1e-5)
    try:
        return DiTConfig(input_size=integer("sample_size", 32), patch_size=integer("patch_size", 2),
                         in_channels=in_ch, hidden_size=hidden, depth=integer("num_layers", 28),
                         num_heads=heads, num_classes=integer("num_embeds_ada_norm", None),
                         learn_sigma=out_ch == 2 * in_ch, norm_eps=eps, timestep_freq_shift=1)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def convert_diffusers_state(d: dict[str, torch.Tensor], config: DiTConfig, source: str) -> dict[str, torch.Tensor]:
    """diffusers keys -> published DiT keys. Per-block embedder copies must agree."""
    try:
        out: dict[str, torch.Tensor] = {"x_embedder.proj.weight": d["pos_embed.proj.weight"],
                                        "x_embedder.proj.bias": d["pos_embed.proj.bias"]}
        emb = "transformer_blocks.{}.norm1.emb."
        pairs = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2",
                 "y_embedder.embedding_table": "class_embedder.embedding_table"}
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                key0 = emb.format(0) + f"{theirs}.{kind}"
                if key0 not in d:
                    continue
                for i in range(1, config.depth):
                    other = d[emb.format(i) + f"{theirs}.{kind}"]
                    if not torch.equal(other, d[key0]):
                        raise CheckpointError(
                            f"{source}: block {i} has its own {theirs}.{kind}, different from block 0; the "
                            "published DiT shares one embedder, so ditas' DiT cannot represent it: load it with "
                            "diffusers (DiTTransformer2DModel.from_pretrained) and quantize it in place with "
                            "ditas.quantize_ (docs/api.md)")
                out[f"{ours}.{kind}"] = d[key0]
        for i in range(config.depth):
            p, q = f"transformer_blocks.{i}.", f"blocks.{i}."
            for kind in ("weight", "bias"):
                out[q + f"attn.qkv.{kind}"] = torch.cat([d[p + f"attn1.to_{n}.{kind}"] for n in "qkv"], dim=0)
                out[q + f"attn.proj.{kind}"] = d[p + f"attn1.to_out.0.{kind}"]
                out[q + f"mlp.fc1.{kind}"] = d[p + f"ff.net.0.proj.{kind}"]
                out[q + f"mlp.fc2.{kind}"] = d[p + f"ff.net.2.{kind}"]
                out[q + f"adaLN_modulation.1.{kind}"] = d[p + f"norm1.linear.{kind}"]
        for kind in ("weight", "bias"):
            out[f"final_layer.adaLN_modulation.1.{kind}"] = d[f"proj_out_1.{kind}"]
            out[f"final_layer.linear.{kind}"] = d[f"proj_out_2.{kind}"]
    except KeyError as exc:
        raise CheckpointError(f"{source}: not a diffusers DiT state dict (missing {exc.args[0]})") from None
    grid = config.input_size // config.patch_size
    out["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(config.hidden_size, grid)).float().unsqueeze(0)
    return out


def read_diffusers_dit(folder: Path, cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], DiTConfig]:
    """The published-layout state dict and ``DiTConfig`` of a diffusers DiT folder (``cfg``: its
    parsed ``config.json``); ``model/loading.py`` builds the model from them."""
    source = str(folder)
    config = diffusers_config_to_dit(cfg, source)
    return convert_diffusers_state(_read_weights(folder), config, source), config
