"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``).

Each ``JointTransformerBlock`` has two streams, image (``hidden_states``) and context (text),
each modulated by its own adaLN-Zero linear (``norm1.linear``, ``norm1_context.linear``: chunks
shift, scale, gate of the attention, then of the MLP), one joint attention over both streams'
tokens, and one GELU MLP per stream. The last block's context stream is ``context_pre_only``: its
modulation is an ``AdaLayerNormContinuous`` (2 chunks: scale THEN shift), it has no context
output projection and no context MLP. SD3.5 blocks listed in ``dual_attention_layers`` add a
second self-attention ``attn2`` on the image stream, modulated by chunks 6-8 of ``norm1.linear``.

Smoothing folds: the input projections of each stream and each MLP's first linear fold into
their stream's adaLN rows (exact); ``attn2``'s output projection into the rows of ``attn2.to_v``.
The joint attention's output projections read an attention over BOTH streams' values (``to_v``
and ``add_v_proj``), so their factors divide their input on the fly, as the MLP's second linears
(after GELU). Weight-only int8: every block's modulation linears and ``norm_out.linear``.
"""

from __future__ import annotations

from typing import Any

from .base import BlockCall, BlockSpec, Fold
from ._diffusers import DiffusersAdapter, joint_next_call
from .registry import register


@register
class SD3Adapter(DiffusersAdapter):
    family = "sd3"
    class_name = "SD3Transformer2DModel"
    text_to_image = True

    def blocks(self) -> list[BlockSpec]:
        specs = []
        for i, block in enumerate(self.model.transformer_blocks):
            n = f"transformer_blocks.{i}"
            ctx_chunks = self.model.get_submodule(f"{n}.norm1_context.linear").out_features // block.norm2.normalized_shape[0]
            # AdaLayerNormContinuous (context_pre_only) is (scale, shift); AdaLayerNormZero (shift, scale, ...)
            ctx_shift, ctx_scale = (1, 0) if ctx_chunks == 2 else (0, 1)
            groups = [
                self.group(n, i, ["attn.to_out.0"], "proj"),
                self.group(n, i, ["attn.to_add_out"], "proj"),
                self.group(n, i, ["attn.to_q", "attn.to_k", "attn.to_v"], "qkv", self.adaln(f"{n}.norm1.linear", 0, 1)),
                self.group(n, i, ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "qkv",
                           self.adaln(f"{n}.norm1_context.linear", ctx_shift, ctx_scale)),
            ]
            if block.attn2 is not None:
                groups += [
                    self.group(n, i, ["attn2.to_out.0"], "proj", Fold("prev_rows", f"{n}.attn2.to_v")),
                    self.group(n, i, ["attn2.to_q", "attn2.to_k", "attn2.to_v"], "qkv",
                               self.adaln(f"{n}.norm1.linear", 6, 7)),
                ]
            groups += [
                self.group(n, i, ["ff.net.2"], "fc2"),
                self.group(n, i, ["ff.net.0.proj"], "fc1", self.adaln(f"{n}.norm1.linear", 3, 4)),
                self.group(n, i, ["ff_context.net.2"], "fc2"),
            ]
            if block.ff_context is not None:
                groups.append(self.group(n, i, ["ff_context.net.0.proj"], "fc1",
                                         self.adaln(f"{n}.norm1_context.linear", 3, 4)))
            specs.append(self.spec(n, i, "transformer_blocks", groups))
        return specs

    def weight_only_linears(self) -> list[str]:
        names = [f"transformer_blocks.{i}.{m}.linear" for i in range(len(self.model.transformer_blocks))
                 for m in ("norm1", "norm1_context")]
        return [n for n in names + ["norm_out.linear"] if self.has(n)]

    def next_call(self, block: BlockSpec, call: BlockCall, output: Any) -> BlockCall:
        return joint_next_call(call, output)
