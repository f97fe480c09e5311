"""ditas' kernel products as PyTorch custom ops (namespace ``ditas::``), so that ``torch.compile``
and ``torch.export`` can trace a quantized model.

The integer products read tensor values on the host (oneDNN takes the activation scale and zero
point as numbers; ``int8_matmul_zp`` chooses int32 or int64 from the zero points' size; CUDA's
``_int_mm`` needs padding), which dynamo cannot trace and inductor's own oneDNN lowering does not
accept. Wrapped as custom ops with fake implementations (output shape and dtype only), each is one
opaque node of the graph: the float work around it (activation quantization, the LoRA branch,
bias, GELU, attention) is traced and fused by inductor, the product runs the very code eager runs.

The kernels call the ops (``torch.ops.ditas.<name>``) in eager mode too, so eager and compiled
models compute the products with the same function. Importing ``ditas.quantization.kernels``
registers them (once per process: torch's operator registry is global by design).

- ``ditas::int_mm(a, b)``: ``torch._int_mm`` with the padding a device needs (``int_mm.int_mm``);
- ``ditas::int_mm_linear(...)``: the ``int_mm`` kernel's product (``int_mm.int_mm_linear``);
- ``ditas::onednn_linear(...)``: the ``onednn`` kernel's product, optionally with the LoRA branch
  in the epilogue (``onednn.onednn_linear``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from .int_mm import int_mm as _int_mm_padded
from .int_mm import int_mm_linear as _int_mm_linear
from .onednn import onednn_linear as _onednn_linear

__all__ = ["int_mm", "int_mm_linear", "onednn_linear"]


@custom_op("ditas::int_mm", mutates_args=())
def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 ``a @ b`` of int8 (M, K) and (K, N) (padded where the device needs it)."""
    return _int_mm_padded(a, b).contiguous()  # the padded result is a slice: a fresh tensor out


@int_mm.register_fake
def _int_mm_fake(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


@custom_op("ditas::int_mm_linear", mutates_args=())
def int_mm_linear(codes: Tensor, a_scale: Tensor, a_zero: Tensor, w_int8: Tensor, rowsum: Tensor, wscale: Tensor,
                  residual: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """Float32 (M, rows of ``w_int8``) product of the ``int_mm`` kernel (``int_mm.int_mm_linear``)."""
    return _int_mm_linear(codes, a_scale, a_zero, w_int8, rowsum, wscale, residual, bias)


@int_mm_linear.register_fake
def _int_mm_linear_fake(codes, a_scale, a_zero, w_int8, rowsum, wscale, residual, bias) -> Tensor:
    return codes.new_empty((codes.shape[0], w_int8.shape[0]), dtype=torch.float32)


@custom_op("ditas::onednn_linear", mutates_args=())
def onednn_linear(codes: Tensor, a_scale: Tensor, a_zero: Tensor, packed: Tensor, wscale: Tensor,
                  zero_points: Tensor, rowsum_scaled: Tensor, residual_scaled: Optional[Tensor],
                  bias: Optional[Tensor], other: Optional[Tensor]) -> Tensor:
    """Float32 (M, rows of the packed weight) product of the ``onednn`` kernel (``onednn.onednn_linear``)."""
    return _onednn_linear(codes, a_scale, a_zero, packed, wscale, zero_points, rowsum_scaled, residual_scaled,
                          bias, other)


@onednn_linear.register_fake
def _onednn_linear_fake(codes, a_scale, a_zero, packed, wscale, zero_points, rowsum_scaled, residual_scaled,
                        bias, other) -> Tensor:
    return codes.new_empty((codes.shape[0], wscale.shape[0]), dtype=torch.float32)
