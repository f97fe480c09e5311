"""PixArt-alpha / PixArt-Sigma (diffusers ``PixArtTransformer2DModel``).

Each ``BasicTransformerBlock`` (norm type ``ada_norm_single``) computes

    m = table + t                         (6 chunks; ``t`` = adaln_single(timestep), SHARED by all blocks)
    x = x + g_msa * attn1(LN(x) * (1 + sc_msa) + sh_msa)          self-attention
    x = x + attn2(x, text)                                          cross-attention (no norm)
    x = x + g_mlp * ff(LN(x) * (1 + sc_mlp) + sh_mlp)              GELU(tanh) MLP

Smoothing folds: the modulation is the per-block ``scale_shift_table`` PLUS the shared
adaLN-single output, so a per-block factor cannot be folded exactly into either (dividing the
shared linear's rows would change every block): the self-attention projections and ``ff``'s first
linear divide their input on the fly. The attention output projections fold into the rows of
their ``to_v`` (self and cross attention: attention is linear in V). The cross-attention key/value
projections read the caption projection, also shared: on the fly. ``ff.net.2`` reads GELU's
output: on the fly. Weight-only int8: ``adaln_single.linear`` (the one modulation linear).
"""

from __future__ import annotations

from typing import Any

from .base import BlockCall, BlockSpec, Fold
from ._diffusers import DiffusersAdapter
from .registry import register


@register
class PixArtAdapter(DiffusersAdapter):
    family = "pixart"
    class_name = "PixArtTransformer2DModel"
    text_to_image = True

    def blocks(self) -> list[BlockSpec]:
        specs = []
        for i, block in enumerate(self.model.transformer_blocks):
            name = f"transformer_blocks.{i}"
            for attn in ("attn1", "attn2"):
                if getattr(getattr(block, attn, None), "fused_projections", False):
                    from ...errors import ConfigError

                    raise ConfigError(f"{name}.{attn} has fused projections: call unfuse_qkv_projections() first")
            groups = [
                # attention outputs first: their factors go into the rows of to_v before it is quantized
                self.group(name, i, ["attn1.to_out.0"], "proj", Fold("prev_rows", f"{name}.attn1.to_v")),
                self.group(name, i, ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "qkv"),
            ]
            if block.attn2 is not None:
                groups += [
                    self.group(name, i, ["attn2.to_out.0"], "proj", Fold("prev_rows", f"{name}.attn2.to_v")),
                    self.group(name, i, ["attn2.to_q"], "qkv"),
                    self.group(name, i, ["attn2.to_k", "attn2.to_v"], "qkv"),
                ]
            groups += [
                self.group(name, i, ["ff.net.2"], "fc2"),
                self.group(name, i, ["ff.net.0.proj"], "fc1"),
            ]
            specs.append(self.spec(name, i, "transformer_blocks", groups))
        return specs

    def weight_only_linears(self) -> list[str]:
        return ["adaln_single.linear"] if self.has("adaln_single.linear") else []

    def next_call(self, block: BlockSpec, call: BlockCall, output: Any) -> BlockCall:
        # blocks are called as block(hidden_states, attention_mask=..., encoder_hidden_states=..., ...)
        if call.args:
            return BlockCall((output,) + tuple(call.args[1:]), dict(call.kwargs))
        return BlockCall((), {**call.kwargs, "hidden_states": output})
