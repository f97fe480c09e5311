"""``simulated``: the float simulation of ``QuantLinear`` (any device, any layout).

Dequantized weight, fake-quantized input (every format: INT per tensor / token / group, FP4); the reference every integer kernel is tested against.
The LoRA branch reads the same quantized input, so it is merged into one cached weight
``W_q + up @ down`` (one matmul instead of three, the same function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..quantizers import ACT_GRANULARITIES, FORMATS
from .base import Kernel, cached


@dataclass
class SimulatedState:
    """The cached effective weight (made at the first forward, so loading allocates no float copy)."""

    weight: torch.Tensor | None = None
    rank: int = 0  # the LoRA rank merged into ``weight``


class Simulated(Kernel):
    name = "simulated"
    summary = "float simulation (any device, any layout, any format)"
    devices = ("cpu", "cuda", "mps", "xpu")
    layouts = ("channel", "group", "reference32")
    formats = FORMATS
    act_granularities = ACT_GRANULARITIES
    max_abits = 16
    preference = 90

    def prepare(self, layer: Any) -> SimulatedState:
        return SimulatedState()

    def forward(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        st = layer.kernel_state
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:  # bf16/fp16 models: quantized and multiplied in fp32, as stored
            x2 = x2.float()
        xq = layer.fake_quant_input(x2)
        if st.rank != layer.lora_rank:
            st.weight, st.rank = None, layer.lora_rank
        y = F.linear(xq, cached(st, "weight", layer.effective_weight), layer.bias)
        return y.reshape(*shape[:-1], layer.out_features).to(x.dtype)
