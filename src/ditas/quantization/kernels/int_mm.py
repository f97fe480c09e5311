"""``int_mm``: ``torch._int_mm`` (s8 x s8 -> s32) with exact zero-point corrections; CPU and CUDA.

The activation codes go in as ``a - 128`` (int8); the weight as the prepared ``q - shift``
(``integer.py``); :func:`int8_matmul_zp` applies the zero points exactly in integers, then one
float pass scales the result. Any zero point the loader accepts (``validate.MAX_ZERO_POINT``)
keeps the corrections exact: past int32 they run in int64.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .integer import IntegerKernel, IntWeightState

_INT32_MAX = 2 ** 31 - 1


def _as_int_column(z: torch.Tensor | int, rows: int, name: str) -> torch.Tensor:
    z = torch.as_tensor(z)
    if z.is_floating_point():
        if not torch.equal(z, torch.round(z)):
            raise ValueError(f"{name} must hold integers")
    return z.to(torch.int64).reshape(-1, 1) if z.numel() > 1 else z.to(torch.int64).reshape(1, 1).expand(rows, 1)


def int8_matmul_zp(a_int8: torch.Tensor, a_zero: torch.Tensor | int, w_int8: torch.Tensor,
                   w_zero: torch.Tensor | int | None = None, w_rowsum: torch.Tensor | None = None,
                   wide: bool = False) -> torch.Tensor:
    """Exact ``sum_k (a[m,k] - a_zero[m]) * (w[n,k] - w_zero[n])`` as int32 (M, N).

    ``a_int8`` (M, K) and ``w_int8`` (N, K) are int8; ``a_zero`` is an integer scalar or (M, 1);
    ``w_zero`` an integer scalar, (N,) or (N, 1), or None for 0; ``w_rowsum`` (N,) the row sums of
    ``w_int8`` (computed if not given). The product runs in ``torch._int_mm`` (int32 accumulation);
    the zero-point corrections
    ``acc - a_zero * rowsum(w) - w_zero * (rowsum(a) - K * a_zero)`` are done in int32 when a
    bound shows they cannot overflow, otherwise in int64. Raises ``OverflowError`` if the exact
    result does not fit in int32 (``wide``: returns it as int64 instead), ``ValueError`` for wrong
    dtypes or shapes.
    """
    if a_int8.dtype != torch.int8 or w_int8.dtype != torch.int8 or a_int8.ndim != 2 or w_int8.ndim != 2:
        raise ValueError(f"a_int8 and w_int8 must be 2-D int8, got {a_int8.dtype} {tuple(a_int8.shape)} and "
                         f"{w_int8.dtype} {tuple(w_int8.shape)}")
    m, k = a_int8.shape
    n, k2 = w_int8.shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: activations (M, {k}) vs weight (N, {k2})")
    if k > 2 ** 17:
        raise ValueError(f"K = {k} is too large for int32 accumulation of int8 products")
    za = _as_int_column(a_zero, m, "a_zero")
    if za.shape[0] != m:
        raise ValueError(f"a_zero must be a scalar or (M, 1) = ({m}, 1), got {tuple(torch.as_tensor(a_zero).shape)}")
    zw = torch.zeros(n, 1, dtype=torch.int64) if w_zero is None else _as_int_column(w_zero, n, "w_zero")
    if zw.shape[0] != n:
        raise ValueError(f"w_zero must be a scalar or (N,) = ({n},), got {tuple(torch.as_tensor(w_zero).shape)}")
    za, zw = za.to(a_int8.device), zw.to(a_int8.device)
    rowsum_w = w_int8.sum(dim=1, dtype=torch.int64) if w_rowsum is None else w_rowsum.to(torch.int64).reshape(-1)
    acc = int_mm(a_int8, w_int8.t())
    need_zw = bool((zw != 0).any())
    za_max, zw_max = int(za.abs().max()), int(zw.abs().max())
    bound = k * (128 + za_max) * (128 + zw_max)
    if bound <= _INT32_MAX:  # every term below is bounded by `bound`
        out = acc - za.to(torch.int32) * rowsum_w.to(torch.int32)[None, :]
        if need_zw:
            asum = a_int8.sum(dim=1, keepdim=True, dtype=torch.int32) - k * za.to(torch.int32)
            out -= asum * zw.to(torch.int32).reshape(1, -1)
        return out
    out = acc.to(torch.int64) - za * rowsum_w[None, :]
    if need_zw:
        out -= (a_int8.sum(dim=1, keepdim=True, dtype=torch.int64) - k * za) * zw.reshape(1, -1)
    if wide:
        return out
    if out.numel() and int(out.abs().max()) > _INT32_MAX:
        raise OverflowError("the exact zero-point-corrected product does not fit in int32")
    return out.to(torch.int32)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` with padding where a device needs it.

    On CPU any shape works (checked by the tests: M = 1, K and N not multiples of 8). CUDA needs
    M > 16 and K, N multiples of 8, so other devices get zero padding, which leaves the exact
    result unchanged.
    """
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    if (mp, kp, np_) != (m, k, n):
        a = torch.nn.functional.pad(a, (0, kp - k, 0, mp - m))
        b = torch.nn.functional.pad(b, (0, np_ - n, 0, kp - k))
    return torch._int_mm(a, b)[:m, :n]


def int_mm_linear(codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, w_int8: torch.Tensor,
                  rowsum: torch.Tensor, wscale: torch.Tensor, residual: torch.Tensor | None,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """Float32 (M, N) product of a prepared weight (``integer.IntWeightState``'s tensors):
    ``a - 128`` in int8, exact zero-point corrections, then one scaling pass. ``a_scale``/``a_zero``
    are scalars (per-tensor) or (M, 1) (per-token). Reads tensor values on the host (the int32/int64
    choice), so torch.compile sees it only as the custom op ``ditas::int_mm_linear`` (``ops.py``)."""
    per_tensor = a_scale.numel() == 1
    a8 = (codes.to(torch.int16) - 128).to(torch.int8)
    za8 = (a_zero.reshape(-1, 1) if not per_tensor else a_zero.reshape(1, 1)).to(torch.int64) - 128
    acc = int8_matmul_zp(a8, za8, w_int8, residual, rowsum, wide=True)
    y = acc.float().mul_(wscale).mul_(a_scale.reshape(-1, 1) if not per_tensor else a_scale.reshape(()))
    if bias is not None:
        y.add_(bias)
    return y


@lru_cache(maxsize=None)
def int_mm_exact_on_cpu() -> bool:
    """Whether ``torch._int_mm`` is exact on this CPU (checked once) for the extreme products
    127 x 127 and 127 x -128: without VNNI oneDNN computes s8 x s8 as (a + 128) x w summed in
    int16 pairs, which saturate (measured under ``ONEDNN_MAX_CPU_ISA=AVX2``: 8160 for 1032256)."""
    try:
        a = torch.full((32, 64), 127, dtype=torch.int8)
        w = torch.cat([torch.full((64, 8), 127), torch.full((64, 8), -128), torch.arange(-64, 64).reshape(64, 2)
                       .repeat(1, 8)], dim=1).to(torch.int8)
        return torch.equal(torch._int_mm(a, w).long(), a.long() @ w.long())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class IntMM(IntegerKernel):
    name = "int_mm"
    summary = "torch._int_mm s8 x s8 -> s32 with zero-point corrections (CPU, CUDA)"
    devices = ("cpu", "cuda")
    preference = 1

    def available(self) -> bool:
        return hasattr(torch, "_int_mm")

    def exact_on(self, device: torch.device) -> bool:
        return device.type != "cpu" or int_mm_exact_on_cpu()

    def pack(self, w_int8: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return w_int8, None

    def unpack(self, st: IntWeightState) -> torch.Tensor:
        return st.w_int8

    def product(self, st: IntWeightState, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
                per_tensor: bool) -> torch.Tensor:
        """``int_mm_linear`` as the custom op ``ditas::int_mm_linear`` (traceable by torch.compile)."""
        return torch.ops.ditas.int_mm_linear(codes, a_scale, a_zero, st.w_int8, st.rowsum, st.wscale, st.residual,
                                             st.bias)
