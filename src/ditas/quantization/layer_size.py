"""How many bytes a quantized layer stores against its float weight, and the LoRA rank cap that
keeps a "4-bit" layer smaller than the float one.

A layer's stored size counts what the quantization adds in place of the float weight: the packed
codes (``wbits`` per weight), the weight scales (float32; FP4 block scales one byte each, plus
NVFP4's float32 tensor scale) and zero points (one byte each, as saved since format 3), the LoRA factors in their storage dtype and the smoothing vector (float32).
The bias is left out: the float layer has the same one. The float size is ``out x in`` in the
model's dtype (a bf16 model's float weight is half an fp32 one's).

With a LoRA rank near half a layer's smaller side the factors alone outweigh the codes; a width-32
layer at rank 16 stores more than its float weight. ``rank_cap`` gives the largest rank below that.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layer_schema import layer_tensors


def _bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def stored_bytes(in_f: int, out_f: int, weights, *, rank: int, lora_dtype: torch.dtype, smooth: bool) -> int:
    """Bytes a quantized ``in_f -> out_f`` layer stores for its weight (see the module docstring)."""
    t = layer_tensors(in_f, out_f, weights, bias=False, smooth=smooth, lora_rank=rank, lora_dtype=lora_dtype)
    total = -(-out_f * in_f * weights.bits // 8)  # the packed codes
    fp4 = weights.format != "int"  # FP4 block scales are saved as their uint8 bits (E4M3 / E8M0)
    total += _bytes(t["wscale"][0], torch.uint8 if fp4 else torch.float32)
    if t["wzero"] is not None:
        total += _bytes(t["wzero"][0], torch.uint8)
    for name in ("wtscale", "smooth", "lora_down", "lora_up"):
        if t[name] is not None:
            total += _bytes(*t[name])
    return total


def float_bytes(in_f: int, out_f: int, dtype: torch.dtype) -> int:
    """Bytes of the float ``in_f -> out_f`` weight in ``dtype``."""
    return _bytes((out_f, in_f), dtype)


def rank_cap(shapes: Sequence[tuple[int, int, torch.dtype]], weights, lora_dtype: torch.dtype, smooth: bool,
             rank: int) -> int:
    """The largest rank <= ``rank`` at which every layer of ``shapes`` ((in, out, float dtype): the
    members of one group, which share the LoRA down factor) stores fewer bytes than its float
    weight; 0 when even rank 1 would not (the layer is then quantized without LoRA)."""
    best = rank
    for in_f, out_f, dtype in shapes:
        room = float_bytes(in_f, out_f, dtype) - stored_bytes(in_f, out_f, weights, rank=0, lora_dtype=lora_dtype,
                                                              smooth=smooth)
        per_rank = _bytes((in_f + out_f,), lora_dtype)
        best = min(best, max(0, -(-room // per_rank) - 1))  # the largest r with r * per_rank < room
    return best


def module_bytes(m, float_dtype: torch.dtype) -> dict[str, int]:
    """A converted ``QuantLinear``'s stored size and its float weight's in ``float_dtype`` (the
    dtype of the linear it replaced): report.json's ``layer_bytes``."""
    return {"stored": stored_bytes(m.in_features, m.out_features, m.weight_format, rank=m.lora_rank,
                                   lora_dtype=m.lora_dtype, smooth=m.smooth is not None),
            "float": float_bytes(m.in_features, m.out_features, float_dtype)}
