"""The adapter of diffusers' ``DiTTransformer2DModel``, quantized in place inside the diffusers class.

Each block ``transformer_blocks.i`` (``BasicTransformerBlock`` with ``ada_norm_zero``) has its own
``norm1.emb`` (timestep and label embedders): they may differ between blocks ("untied"), and are
kept as they are (``load_dit`` converts a diffusers DiT to ditas' DiT only when they are tied).

Per block: ``attn1.to_q``/``to_k``/``to_v`` read the same modulated tokens (one group, role ``qkv``,
folded into chunks (shift 0, scale 1) of the 6 chunks of ``norm1.linear``); ``attn1.to_out.0``
(``proj``) reads the attention output, linear in V: its factor goes into all rows of ``to_v``;
``ff.net.0.proj`` (``fc1``) reads ``norm3(x) * (1 + scale_mlp) + shift_mlp``: chunks (3, 4);
``ff.net.2`` (``fc2``, after GELU) divides on the fly. Weight-only: every ``norm1.linear`` and
``proj_out_1``. Blocks are called ``block(hidden_states, timestep=..., class_labels=..., ...)``;
the next block gets the output as ``hidden_states``. Class conditioning with the null label
``num_embeds_ada_norm`` for guidance, so the model samples its own calibration run.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ...errors import CalibrationError
from ._diffusers import DiffusersAdapter
from .base import ON_THE_FLY, BlockCall, BlockSpec, CalibrationSampler, Fold, LinearSpec, SmoothGroup
from .registry import register


def replace_hidden_states(call: BlockCall, hidden: Any) -> BlockCall:
    """``call`` with its first argument (``hidden_states``, positional or keyword) replaced."""
    if call.args:
        return BlockCall((hidden,) + tuple(call.args[1:]), dict(call.kwargs))
    return BlockCall((), {**call.kwargs, "hidden_states": hidden})


@register
class DiffusersDiTAdapter(DiffusersAdapter):
    family = "diffusers-dit"
    class_name = "DiTTransformer2DModel"

    def blocks(self) -> list[BlockSpec]:
        out = []
        for i, _ in enumerate(self.model.transformer_blocks):
            p = f"transformer_blocks.{i}"

            def lin(rel: str, role: str) -> LinearSpec:
                return LinearSpec(f"{p}.{rel}", i, rel, role)

            def adaln(sh: int, sc: int) -> Fold:
                return Fold("adaln_rows", f"{p}.norm1.linear", num_chunks=6, shift_chunk=sh, scale_chunk=sc)

            groups = (  # to_out.0 first: its factor divides to_v's rows before the q/k/v group is searched
                SmoothGroup((lin("attn1.to_out.0", "proj"),), "proj", Fold("prev_rows", f"{p}.attn1.to_v")),
                SmoothGroup((lin("ff.net.2", "fc2"),), "fc2", ON_THE_FLY),
                SmoothGroup((lin("attn1.to_q", "qkv"), lin("attn1.to_k", "qkv"), lin("attn1.to_v", "qkv")), "qkv",
                            adaln(0, 1)),
                SmoothGroup((lin("ff.net.0.proj", "fc1"),), "fc1", adaln(3, 4)),
            )
            out.append(BlockSpec(p, i, "transformer_blocks", groups))
        return out

    def weight_only_linears(self) -> list[str]:
        return [f"transformer_blocks.{i}.norm1.linear" for i in range(len(self.model.transformer_blocks))] + \
            ["proj_out_1"]

    def next_call(self, block: BlockSpec, call: BlockCall, output: Any) -> BlockCall:
        return replace_hidden_states(call, output)

    def calibration_sampler(self) -> CalibrationSampler:
        view = ClassConditionalView(self.model)
        return CalibrationSampler(view, view.num_classes, self.model.transformer_blocks[0], "transformer.")


class ClassConditionalView(nn.Module):
    """A diffusers DiT seen through ditas' class-conditional sampling interface
    (``forward(x, t, y)``, ``forward_with_cfg``, ``config.in_channels/input_size/learn_sigma``,
    ``num_classes``), so ditas' samplers can run it for its own calibration trajectory."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        c = transformer.config
        if c.num_embeds_ada_norm is None:
            raise CalibrationError("this diffusers DiT has no class conditioning (num_embeds_ada_norm is null)")
        out = c.out_channels or c.in_channels
        self.num_classes = int(c.num_embeds_ada_norm)
        self.config = SimpleNamespace(in_channels=c.in_channels, input_size=c.sample_size,
                                      learn_sigma=out == 2 * c.in_channels, space="latent")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The transformer in its own dtype (a bf16 model takes the fp32 sampler's latents cast, as
        DiTPipeline casts them); the output in the sampler's dtype."""
        dtype = self.transformer.pos_embed.proj.weight.dtype
        return self.transformer(x.to(dtype), timestep=t, class_labels=y, return_dict=False)[0].to(x.dtype)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        from ..dit import DiT

        return DiT.forward_with_cfg(self, x, t, y, cfg_scale, guide_channels)
