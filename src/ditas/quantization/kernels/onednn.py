"""``onednn``: oneDNN's u8 x s8 -> fp32 quantized linear (``torch.ops.onednn.qlinear_pointwise``), CPU.

It takes the uint8 codes and the activation zero point directly and applies the scales and bias
in its epilogue; on x86 CPUs with VNNI/AMX it is 1.1-1.4x faster than ``int_mm`` at DiT-XL/2
shapes (``benchmarks/bench_int_backend.py``). The weight is handed to oneDNN packed (its own copy);
per-token activations use one common zero point inside the kernel and the per-token remainder
outside; for per-tensor activations the LoRA branch is added in the epilogue.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .integer import IntegerKernel, IntWeightState


@lru_cache(maxsize=None)
def onednn_works() -> bool:
    """Whether this torch build has a oneDNN quantized linear that is exact on this CPU (checked
    once). The check includes codes 255 against weights 127 and -128: without VNNI (an AVX2-only
    CPU, or ``ONEDNN_MAX_CPU_ISA=AVX2``) oneDNN sums pairs of u8 x s8 products in int16 and
    saturates them."""
    try:
        a = torch.cat([torch.arange(24).reshape(3, 8), torch.full((1, 8), 255)]).to(torch.uint8)
        w = torch.cat([torch.arange(32).reshape(4, 8) % 7 - 3, torch.full((1, 8), 127),
                       torch.full((1, 8), -128)]).to(torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        y = torch.ops.onednn.qlinear_pointwise(a, 1.0, 5, packed, torch.ones(6), torch.zeros(6, dtype=torch.int64),
                                               None, 1.0, 0, torch.float32, "none", [], "")
        return torch.equal(y, ((a.long() - 5) @ w.long().t()).float())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _qlinear(codes_u8: torch.Tensor, x_scale: float, x_zero: int, packed: torch.Tensor, wscale: torch.Tensor,
             zero_points: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor | None = None) -> torch.Tensor:
    """One oneDNN product of the prepared weight (``other``: added in the epilogue)."""
    if other is None:
        return torch.ops.onednn.qlinear_pointwise(codes_u8, x_scale, x_zero, packed, wscale, zero_points, bias,
                                                  1.0, 0, torch.float32, "none", [], "")
    return torch.ops.onednn.qlinear_pointwise.binary(codes_u8, x_scale, x_zero, packed, wscale, zero_points, other,
                                                     bias, 1.0, 0, torch.float32, 1.0, 0, "add", 1.0, "none", [], "")


def onednn_linear(codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, packed: torch.Tensor,
                  wscale: torch.Tensor, zero_points: torch.Tensor, rowsum_scaled: torch.Tensor,
                  residual_scaled: torch.Tensor | None, bias: torch.Tensor | None,
                  other: torch.Tensor | None) -> torch.Tensor:
    """Float32 (M, rows) product of a prepared weight (``integer.IntWeightState``'s tensors).

    Per-tensor activations: one oneDNN call (``other``, if given, added in its epilogue: only
    without residual zero points); per-token: one common zero point inside the kernel and the
    per-token remainder outside. Passes the scale and zero point to oneDNN as host numbers, so
    torch.compile sees it only as the custom op ``ditas::onednn_linear`` (``ops.py``).
    """
    k = codes.shape[1]
    q = codes.to(torch.uint8)
    if other is not None:
        if a_scale.numel() != 1 or residual_scaled is not None:
            raise ValueError("the fused LoRA epilogue needs per-tensor activations and no residual zero points")
        return _qlinear(q, float(a_scale), int(a_zero), packed, wscale, zero_points, bias, other=other)
    if a_scale.numel() == 1:
        y = _qlinear(q, float(a_scale), int(a_zero), packed, wscale, zero_points, bias)
        if residual_scaled is not None:
            s = (codes.sum(dim=1, dtype=torch.float64) - k * float(a_zero)).float() * float(a_scale)
            y.addr_(s, residual_scaled, alpha=-1)
        return y
    # per-token: one common zero point inside the kernel, the per-token remainder outside
    zc = int(torch.round(a_zero.float().mean()))
    y = _qlinear(q, 1.0, zc, packed, wscale, zero_points, None)
    y.addr_(a_zero.reshape(-1).float() - zc, rowsum_scaled, alpha=-1)
    if residual_scaled is not None:
        s = (codes.sum(dim=1, dtype=torch.float64) - k * a_zero.reshape(-1).double()).float()
        y.addr_(s, residual_scaled, alpha=-1)
    y.mul_(a_scale.reshape(-1, 1))
    if bias is not None:
        y.add_(bias)
    return y


class OneDNN(IntegerKernel):
    name = "onednn"
    summary = "oneDNN u8 x s8 quantized linear (CPU)"
    devices = ("cpu",)
    preference = 0

    def available(self) -> bool:
        return onednn_works()

    def pack(self, w_int8: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, torch.ops.onednn.qlinear_prepack(w_int8.contiguous(), None)

    def unpack(self, st: IntWeightState) -> torch.Tensor:
        return st.packed.to_dense().t()  # oneDNN packs W^T

    def product(self, st: IntWeightState, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
                per_tensor: bool) -> torch.Tensor:
        """``onednn_linear`` as the custom op ``ditas::onednn_linear`` (traceable by torch.compile)."""
        return self._call(st, codes, a_scale, a_zero, None)

    def fused(self, st: IntWeightState, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
              lora: torch.Tensor | None) -> torch.Tensor | None:
        """Per-tensor activations without residual zero points: the LoRA branch in the epilogue."""
        if a_scale.numel() != 1 or st.residual is not None:
            return None
        return self._call(st, codes, a_scale, a_zero, lora)

    @staticmethod
    def _call(st: IntWeightState, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
              other: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.ditas.onednn_linear(codes, a_scale, a_zero, st.packed, st.wscale, st.zero_points,
                                             st.rowsum_scaled, st.residual_scaled, st.bias, other)
