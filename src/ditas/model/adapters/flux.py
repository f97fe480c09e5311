"""Flux.1 (diffusers ``FluxTransformer2DModel``): double-stream, then single-stream blocks.

Double-stream blocks (``transformer_blocks``) are SD3's joint blocks with rotary embeddings and
QK RMS-norm: per stream an adaLN-Zero linear (``norm1.linear``, ``norm1_context.linear``), one
joint attention, one GELU MLP per stream. Single-stream blocks (``single_transformer_blocks``)
concatenate text and image tokens, modulate them once (``norm.linear``: shift, scale, gate) and
feed the SAME input to ``to_q/to_k/to_v`` and ``proj_mlp`` (one smoothing group); ``proj_out``
reads ``[attention output, GELU(proj_mlp)]``. Both kinds of block are called with the same
keywords and return ``(encoder_hidden_states, hidden_states)``, so the transition between the
stacks is the same as between two blocks of one stack.

Smoothing folds: input projections and MLP first linears into their adaLN rows (exact); the joint
attention outputs, the MLP second linears and ``proj_out`` divide their input on the fly.
Fused projections (``fuse_qkv_projections()``: ``to_qkv``, ``to_added_qkv``) are groups of one
(the checkpoint records the fusion; diffusers keeps the unused separate projections, which stay
float and are stored too: unfuse before quantizing to avoid that).
Weight-only int8: every block's modulation linears and ``norm_out.linear``.
"""

from __future__ import annotations

from typing import Any

from .base import BlockCall, BlockSpec
from ._diffusers import DiffusersAdapter, joint_next_call
from .registry import register


@register
class FluxAdapter(DiffusersAdapter):
    family = "flux"
    class_name = "FluxTransformer2DModel"
    text_to_image = True
    timestep_range = 1.0  # the pipeline passes sigma in [0, 1]; the model multiplies by 1000 inside

    def _qkv(self, attn: str) -> list[str]:
        fused = getattr(self.model.get_submodule(attn), "fused_projections", False)
        return ["attn.to_qkv"] if fused else ["attn.to_q", "attn.to_k", "attn.to_v"]

    def _added_qkv(self, attn: str) -> list[str]:
        fused = getattr(self.model.get_submodule(attn), "fused_projections", False)
        return ["attn.to_added_qkv"] if fused else ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]

    def blocks(self) -> list[BlockSpec]:
        specs = []
        for i in range(len(self.model.transformer_blocks)):
            n = f"transformer_blocks.{i}"
            specs.append(self.spec(n, i, "transformer_blocks", [
                self.group(n, i, ["attn.to_out.0"], "proj"),
                self.group(n, i, ["attn.to_add_out"], "proj"),
                self.group(n, i, self._qkv(f"{n}.attn"), "qkv", self.adaln(f"{n}.norm1.linear", 0, 1)),
                self.group(n, i, self._added_qkv(f"{n}.attn"), "qkv", self.adaln(f"{n}.norm1_context.linear", 0, 1)),
                self.group(n, i, ["ff.net.2"], "fc2"),
                self.group(n, i, ["ff.net.0.proj"], "fc1", self.adaln(f"{n}.norm1.linear", 3, 4)),
                self.group(n, i, ["ff_context.net.2"], "fc2"),
                self.group(n, i, ["ff_context.net.0.proj"], "fc1", self.adaln(f"{n}.norm1_context.linear", 3, 4)),
            ]))
        offset = len(specs)
        for j in range(len(self.model.single_transformer_blocks)):
            n, i = f"single_transformer_blocks.{j}", offset + j
            specs.append(self.spec(n, i, "single_transformer_blocks", [
                self.group(n, i, ["proj_out"], "proj"),
                self.group(n, i, self._qkv(f"{n}.attn") + ["proj_mlp"], "qkv", self.adaln(f"{n}.norm.linear", 0, 1)),
            ]))
        return specs

    def model_config(self) -> dict[str, Any]:
        cfg = super().model_config()
        cfg["fused_projections"] = any(getattr(m, "fused_projections", False) for m in self.model.modules())
        return cfg

    @classmethod
    def build(cls, config: dict[str, Any]):
        model = super().build(config)
        if config.get("fused_projections"):
            model.fuse_qkv_projections()  # to_qkv / to_added_qkv, as the quantized model had them
        return model

    def weight_only_linears(self) -> list[str]:
        names = [f"transformer_blocks.{i}.{m}.linear" for i in range(len(self.model.transformer_blocks))
                 for m in ("norm1", "norm1_context")]
        names += [f"single_transformer_blocks.{j}.norm.linear" for j in range(len(self.model.single_transformer_blocks))]
        return [n for n in names + ["norm_out.linear"] if self.has(n)]

    def next_call(self, block: BlockSpec, call: BlockCall, output: Any) -> BlockCall:
        return joint_next_call(call, output)
