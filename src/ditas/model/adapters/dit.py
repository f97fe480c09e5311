"""The adapter of ditas' own DiT (``model/dit.py``, the published layout).

Per block ``blocks.i``: ``attn.qkv`` (fused q/k/v: one group of one), ``attn.proj``, ``mlp.fc1``,
``mlp.fc2``. Smoothing factors go: ``qkv`` -> adaLN chunks (shift 0, scale 1) of
``adaLN_modulation.1``; ``fc1`` -> chunks (3, 4); ``proj`` -> the V rows (last third) of
``attn.qkv``; ``fc2`` (after GELU) -> on the fly. Weight-only: every ``adaLN_modulation.1`` and
``final_layer.adaLN_modulation.1``. A block is called as ``block(x, c)``; the next block gets
``(output, c)``. The model samples its own calibration run: the calibration labels, with the null
label ``num_classes`` for guidance (``calibration_sampler``: the DiT itself).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..dit import DiT, DiTConfig
from .registry import register
from .base import (ON_THE_FLY, BlockCall, BlockSpec, CalibrationSampler, Fold, LinearSpec, ModelAdapter,
                   SmoothGroup, TimestepInput)

# adaLN chunk indices (shift, scale) of the modulation each role reads, out of 6
ADALN_CHUNKS = {"qkv": (0, 1), "fc1": (3, 4)}


@register
class DiTAdapter(ModelAdapter):
    family = "dit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, DiT)

    def blocks(self) -> list[BlockSpec]:
        d = self.model.config.hidden_size
        out = []
        for i, _ in enumerate(self.model.blocks):
            p = f"blocks.{i}"

            def lin(rel: str, role: str) -> LinearSpec:
                return LinearSpec(f"{p}.{rel}", i, rel, role)

            def adaln(role: str) -> Fold:
                sh, sc = ADALN_CHUNKS[role]
                return Fold("adaln_rows", f"{p}.adaLN_modulation.1", num_chunks=6, shift_chunk=sh, scale_chunk=sc)

            groups = (  # proj first: its factor divides qkv's V rows before qkv is searched
                SmoothGroup((lin("attn.proj", "proj"),), "proj", Fold("prev_rows", f"{p}.attn.qkv", rows=(2 * d, 3 * d))),
                SmoothGroup((lin("mlp.fc2", "fc2"),), "fc2", ON_THE_FLY),
                SmoothGroup((lin("attn.qkv", "qkv"),), "qkv", adaln("qkv")),
                SmoothGroup((lin("mlp.fc1", "fc1"),), "fc1", adaln("fc1")),
            )
            out.append(BlockSpec(p, i, "blocks", groups))
        return out

    def weight_only_linears(self) -> list[str]:
        names = [f"blocks.{i}.adaLN_modulation.1" for i in range(len(self.model.blocks))]
        if hasattr(self.model, "final_layer"):
            names.append("final_layer.adaLN_modulation.1")
        return names

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.blocks]

    def next_call(self, block: BlockSpec, call: BlockCall, output: Any) -> BlockCall:
        return BlockCall((output,) + tuple(call.args[1:]), dict(call.kwargs))

    def calibration_sampler(self) -> CalibrationSampler:
        return CalibrationSampler(self.model, self.model.num_classes, self.model.blocks[0])

    def timestep_input(self) -> TimestepInput:
        # the timestep embedder: ``forward_with_cfg`` calls ``forward`` directly, past the model's hooks
        return TimestepInput("t_embedder", 0, None, 1000.0)

    def model_config(self) -> dict[str, Any]:
        return self.model.config.to_dict()

    @classmethod
    def build(cls, config: dict[str, Any]) -> nn.Module:
        return DiT(DiTConfig.from_dict(config))

