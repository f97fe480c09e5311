"""The integer backend of ``QuantLinear``: int8 x int8 products with int32 accumulation.

``QuantLinear.forward`` (an integer kernel) quantizes its input to codes ``a`` with scale ``s_a``
and zero point ``z_a`` and calls :func:`int_linear`, which returns

    y = s_a * s_w * sum_k (a_k - z_a) (q_k - z_w) + bias

for weight codes ``q``, per-output-channel scale ``s_w`` and zero point ``z_w``. The sum is
evaluated exactly in integers; only the final scaling is floating point, so the result equals
the simulated path ``F.linear((a - z_a) s_a, (q - z_w) s_w, bias)`` up to float rounding.

Weight preparation (once per layer, cached in ``module._int_state``, built from ``qweight``; no
float copy of the weight is ever made). Each row gets an integer shift ``t`` with
``q - t`` in int8: ``t = z_w`` whenever that fits (always for <= 7-bit codes whose zero point lies
within about 128 of the codes, i.e. the usual case), otherwise the nearest value that fits. The
stored weight ``w = q - t`` is then symmetric (zero point 0) except for a residual zero point
``r = z_w - t`` on the rare rows that needed it, corrected with the per-token sums of
``a - z_a``.

Two kernels compute the products (measured in ``benchmarks/bench_int_backend.py``):

- ``"onednn"`` (default when available): ``torch.ops.onednn.qlinear_pointwise``, oneDNN's
  u8 x s8 -> fp32 quantized linear, which takes the uint8 codes and the activation zero point
  directly and applies the scales and bias in its epilogue. On this CPU (AVX-512 VNNI) it is
  1.1-1.4x faster than ``torch._int_mm`` at DiT-XL/2 shapes (single thread; 2-3.5x with two
  threads on a busy machine).
- ``"int_mm"``: ``torch._int_mm`` (s8 x s8 -> s32) on ``a - 128`` plus explicit zero-point
  corrections with precomputed weight row sums (:func:`int8_matmul_zp`), then dequantization.

:func:`int_forward` is a fused replacement for ``QuantLinear.forward`` on the integer backend: it
quantizes the input with the same arithmetic as ``quantizers.activation_codes`` but in place,
computes the low-rank branch from the codes (no dequantized copy of the input) and, for
per-tensor activations, adds it inside the oneDNN epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .quantizers import activation_qparams

__all__ = ["IntWeightState", "KERNELS", "available_kernels", "int8_matmul_zp", "int_forward", "int_linear",
           "prepare_int_weight"]

KERNELS = ("onednn", "int_mm")
_INT32_MAX = 2 ** 31 - 1
LIMB_BASE = 128  # each further int8 limb of the LoRA down rows adds 7 bits
MAX_LORA_LIMBS = 3  # three limbs already match the fp32 product (2.4e-7 of a row's largest entry)
DEFAULT_LORA_LIMBS = 3


@lru_cache(maxsize=None)
def onednn_works() -> bool:
    """Whether this torch build has a oneDNN quantized linear that is exact on this CPU (checked
    once). The check includes codes 255 against weights 127 and -128: without VNNI (an AVX2-only
    CPU, or ``ONEDNN_MAX_CPU_ISA=AVX2``) oneDNN sums pairs of u8 x s8 products in int16 and
    saturates them, so there the "int_mm" kernel is used instead."""
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


_onednn_works = onednn_works


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


def available_kernels() -> tuple[str, ...]:
    """The integer kernels this torch build has that are exact on this CPU, fastest first (see
    ``kernels.KERNELS``); none on a CPU without VNNI."""
    return tuple(k for k in KERNELS if (onednn_works() if k == "onednn" else int_mm_exact_on_cpu()))


# ----------------------------------------------------------------------------------------------
#                                 Exact integer core (reference)
# ----------------------------------------------------------------------------------------------


def _as_int_column(z: torch.Tensor | int, rows: int, name: str) -> torch.Tensor:
    z = torch.as_tensor(z)
    if z.is_floating_point():
        if not torch.equal(z, torch.round(z)):
            raise ValueError(f"{name} must hold integers")
    return z.to(torch.int64).reshape(-1, 1) if z.numel() > 1 else z.to(torch.int64).reshape(1, 1).expand(rows, 1)


def int8_matmul_zp(a_int8: torch.Tensor, a_zero: torch.Tensor | int, w_int8: torch.Tensor,
                   w_zero: torch.Tensor | int | None = None, w_rowsum: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``sum_k (a[m,k] - a_zero[m]) * (w[n,k] - w_zero[n])`` as int32 (M, N).

    ``a_int8`` (M, K) and ``w_int8`` (N, K) are int8; ``a_zero`` is an integer scalar or (M, 1);
    ``w_zero`` an integer scalar, (N,) or (N, 1), or None for 0; ``w_rowsum`` (N,) the row sums of
    ``w_int8`` (computed if not given). The product runs in ``torch._int_mm`` (int32 accumulation);
    the zero-point corrections
    ``acc - a_zero * rowsum(w) - w_zero * (rowsum(a) - K * a_zero)`` are done in int32 when a
    bound shows they cannot overflow, otherwise in int64. Raises ``OverflowError`` if the exact
    result does not fit in int32, ``ValueError`` for wrong dtypes or shapes.
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
    acc = _int_mm(a_int8, w_int8.t())
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
    if out.numel() and int(out.abs().max()) > _INT32_MAX:
        raise OverflowError("the exact zero-point-corrected product does not fit in int32")
    return out.to(torch.int32)


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------
#                                   Prepared weight (cached)
# ----------------------------------------------------------------------------------------------


@dataclass
class IntWeightState:
    """What ``int_linear`` needs of a layer, derived from ``qweight``/``wscale``/``wzero``/``bias``.

    ``w_int8`` is ``qweight - shift`` (N, K) int8 (None once handed to oneDNN, which keeps its own
    packed copy in ``packed``); ``shift`` (N,) int64 gives the codes back exactly
    (:meth:`codes`); ``residual`` is ``wzero - shift`` (N,) int64, or None when it is
    zero for every row; ``rowsum`` the int64 row sums of ``w_int8``. ``wscale`` (N,) float32,
    ``rowsum_scaled = rowsum * wscale`` and ``residual_scaled = residual * wscale`` serve the
    float epilogues.
    """

    kernel: str
    in_features: int
    out_features: int
    w_int8: torch.Tensor | None
    packed: torch.Tensor | None
    rowsum: torch.Tensor
    residual: torch.Tensor | None
    wscale: torch.Tensor
    rowsum_scaled: torch.Tensor
    residual_scaled: torch.Tensor | None
    bias: torch.Tensor | None
    zero_points: torch.Tensor  # (N,) int64 zeros: the weight zero point oneDNN is given
    lora_down_sum: torch.Tensor | None  # (rank,) row sums of lora_down, for int_forward
    shift: torch.Tensor | None = None  # (N,) int64: qweight = w_int8 + shift
    lora_bf16: tuple[torch.Tensor, torch.Tensor] | None = None  # (lora_down, lora_up) in bf16, made on demand
    lora_limbs: int = 0  # int8 limbs of lora_down appended to the weight (0: the down-projection runs apart)
    lora_rank: int = 0
    lora_up_bf16: torch.Tensor | None = None  # lora_up in bf16, made on demand

    @property
    def product_features(self) -> int:
        """Columns of the integer product: the N outputs, then ``lora_limbs * lora_rank`` LoRA rows."""
        return self.out_features + self.lora_limbs * self.lora_rank

    def codes(self) -> torch.Tensor:
        """The uint8 weight codes (N, K) this state was prepared from, re-derived exactly."""
        w = self.w_int8 if self.w_int8 is not None else self.packed.to_dense().t()  # oneDNN packs W^T
        w = w[:self.out_features]  # the appended LoRA rows are not weight codes
        codes = (w.to(torch.int16) + self.shift.to(device=w.device, dtype=torch.int16)[:, None]).to(torch.uint8)
        return codes.contiguous()  # row-major, as saved: a transposed layout would round the simulated matmul differently

    def nbytes(self) -> int:
        """Bytes held by the prepared state (the packed oneDNN weight counts N*K)."""
        total = self.product_features * self.in_features if self.packed is not None else 0
        for t in (self.w_int8, self.shift, self.rowsum, self.residual, self.wscale, self.rowsum_scaled, self.residual_scaled,
                  self.zero_points, self.lora_down_sum, *(self.lora_bf16 or ()), self.lora_up_bf16):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


def lora_limbs(down: torch.Tensor, limbs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``down`` (r, K) as ``limbs`` int8 rows per rank row: (limbs * r, K) int8 and (limbs * r,) scales.

    Row ``i`` of limb ``j`` (row ``j * r + i`` of the result) has scale ``s_i / LIMB_BASE^j`` with
    ``s_i = max_k |down[i, k]| / 127``, and ``sum_j scale_j * limb_j`` approximates ``down`` to
    within ``0.5 * s_i / LIMB_BASE^(limbs - 1)``: relative to the row's largest entry 3.9e-3 (one
    limb: plain int8 per row), 3.1e-5 (two), 2.4e-7 (three, the precision of the fp32 product).
    Each limb is the rounded remainder of the previous ones times ``LIMB_BASE`` (|remainder| <=
    0.5, so every limb after the first lies in [-64, 64]); computed in float64.
    """
    if limbs < 1:
        raise ValueError(f"limbs must be >= 1, got {limbs}")
    d = down.detach().double()
    s = (d.abs().amax(dim=1) / 127).float().clamp(min=torch.finfo(torch.float32).tiny)
    rest = d / s.double()[:, None]
    rows, scales = [], []
    for j in range(limbs):
        q = rest.round().clamp_(-127, 127)
        rows.append(q.to(torch.int8))
        scales.append(s / LIMB_BASE ** j)  # a power of 2: exact in float32
        rest = (rest - q) * LIMB_BASE
    return torch.cat(rows), torch.cat(scales)


def prepare_int_weight(module, kernel: str | None = None, limbs: int | None = None) -> IntWeightState:
    """Builds the integer weight state of a per-channel ``QuantLinear`` (see the module docstring).

    ``limbs`` (default: the layer's ``lora_limbs``, else ``DEFAULT_LORA_LIMBS``): with a LoRA branch,
    its down-projection rows as that many int8 limbs (:func:`lora_limbs`) appended to the weight,
    so one integer product yields the output and the rank-r intermediate; 0 keeps them apart.
    """
    if limbs is None:
        limbs = getattr(module, "lora_limbs", DEFAULT_LORA_LIMBS)
    if not isinstance(limbs, int) or not 0 <= limbs <= MAX_LORA_LIMBS:
        raise ValueError(f"lora limbs must be an integer in 0..{MAX_LORA_LIMBS}, got {limbs!r}")
    if kernel is None:
        if not available_kernels():
            raise ValueError("no integer kernel is exact on this CPU (int8 products saturate without VNNI); "
                             "use the simulated kernel")
        kernel = available_kernels()[0]
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "onednn" and module.qweight.device.type != "cpu":
        raise ValueError(f"the 'onednn' kernel runs on the CPU, not {module.qweight.device}; use kernel='int_mm'")
    if kernel == "onednn" and not onednn_works():
        raise ValueError("the 'onednn' kernel is not available (or not exact) with this torch build on this CPU; "
                         "use kernel='int_mm'")
    if module.layout != "channel":
        raise ValueError(f"the integer backend needs per-channel weights, got layout {module.layout!r}")
    q = module.qweight
    n, k = q.shape
    if q.dtype != torch.uint8:
        raise ValueError(f"qweight must be uint8 codes, got {q.dtype}")
    if module.wscale.shape != (n, 1) or module.wzero.shape != (n, 1):
        raise ValueError(f"per-channel wscale/wzero must be ({n}, 1), got {tuple(module.wscale.shape)} and "
                         f"{tuple(module.wzero.shape)}")
    zero = module.wzero.reshape(-1)
    if not torch.equal(zero, torch.round(zero)):
        raise ValueError("wzero must hold integers")
    qmax = 2 ** module.wbits - 1
    if n and k and int(q.max()) > qmax:
        raise ValueError(f"qweight holds codes above {qmax} for {module.wbits}-bit weights")
    zero = zero.to(torch.int64)
    if k:
        lo, hi = torch.aminmax(q, dim=1)
        lo, hi = lo.to(torch.int64), hi.to(torch.int64)
    else:
        lo = hi = torch.zeros(n, dtype=torch.int64, device=q.device)
    shift = torch.minimum(torch.maximum(zero, hi - 127), lo + 128)  # q - shift in [-128, 127]
    w_int8 = (q.to(torch.int16) - shift.to(torch.int16)[:, None]).to(torch.int8)
    residual = zero - shift
    residual = residual if bool((residual != 0).any()) else None
    wscale = module.wscale.reshape(-1).float().contiguous()
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    rank = module.lora_rank
    limbs = limbs if rank else 0
    if limbs:  # the LoRA down rows join the product: zero bias, zero residual, their own scales
        d8, dscale = lora_limbs(module.lora_down, limbs)
        w_int8 = torch.cat([w_int8, d8.to(w_int8.device)])
        wscale = torch.cat([wscale, dscale.to(wscale.device)])
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(limbs * rank)])
        if residual is not None:
            residual = torch.cat([residual, residual.new_zeros(limbs * rank)])
    rows = w_int8.shape[0]
    rowsum = w_int8.sum(dim=1, dtype=torch.int64)
    packed = None
    if kernel == "onednn":
        packed = torch.ops.onednn.qlinear_prepack(w_int8.contiguous(), None)
        w_int8 = None
    return IntWeightState(kernel=kernel, in_features=k, out_features=n, w_int8=w_int8, packed=packed, rowsum=rowsum,
                          residual=residual, wscale=wscale, rowsum_scaled=rowsum.float() * wscale,
                          residual_scaled=None if residual is None else residual.float() * wscale, bias=bias,
                          zero_points=torch.zeros(rows, dtype=torch.int64, device=q.device),
                          lora_down_sum=module.lora_down.float().sum(dim=1) if rank and not limbs else None,
                          shift=shift,
                          lora_limbs=limbs, lora_rank=rank)


def _state(module, kernel: str | None) -> IntWeightState:
    state = module._int_state
    if kernel is None and getattr(module, "kernel", None) in KERNELS:
        kernel = module.kernel
    limbs = getattr(module, "lora_limbs", DEFAULT_LORA_LIMBS) if module.lora_rank else 0
    if state is None or (kernel is not None and state.kernel != kernel) or state.lora_limbs != limbs:
        state = prepare_int_weight(module, kernel if kernel is not None else None if state is None else state.kernel)
        module._int_state = state
    return state


# ----------------------------------------------------------------------------------------------
#                                         Products
# ----------------------------------------------------------------------------------------------


def _onednn(codes_u8: torch.Tensor, x_scale: float, x_zero: int, st: IntWeightState, bias: torch.Tensor | None,
            other: torch.Tensor | None = None) -> torch.Tensor:
    zeros = st.zero_points
    if other is None:
        return torch.ops.onednn.qlinear_pointwise(codes_u8, x_scale, x_zero, st.packed, st.wscale, zeros, bias,
                                                  1.0, 0, torch.float32, "none", [], "")
    return torch.ops.onednn.qlinear_pointwise.binary(codes_u8, x_scale, x_zero, st.packed, st.wscale, zeros, other,
                                                     bias, 1.0, 0, torch.float32, 1.0, 0, "add", 1.0, "none", [], "")



def _check_inputs(module, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor) -> bool:
    """Validates shapes; returns True for per-tensor activation parameters."""
    if module.layout != "channel" or module.abits > 8:
        raise ValueError(f"the integer backend handles per-channel weights with <= 8-bit activations, got "
                         f"layout={module.layout!r}, abits={module.abits}")
    if codes.ndim != 2 or codes.shape[1] != module.in_features:
        raise ValueError(f"codes must be (M, {module.in_features}), got {tuple(codes.shape)}")
    m = codes.shape[0]
    per_tensor = a_scale.numel() == 1
    if per_tensor != (a_zero.numel() == 1) or (not per_tensor and (a_scale.numel() != m or a_zero.numel() != m)):
        raise ValueError(f"a_scale/a_zero must both be scalars or both (M, 1) = ({m}, 1), got "
                         f"{tuple(a_scale.shape)} and {tuple(a_zero.shape)}")
    return per_tensor


def int_linear(module, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
               kernel: str | None = None) -> torch.Tensor:
    """Float32 (M, out) = ``(codes - a_zero) a_scale @ ((qweight - wzero) wscale)^T + bias``.

    ``codes`` (M, in) holds integers in ``[0, 2^abits - 1]`` (float or integer dtype, as
    ``activation_codes`` returns them); ``a_scale``/``a_zero`` are scalars (per-tensor) or
    (M, 1) (per-token). ``kernel`` picks ``"onednn"`` or ``"int_mm"`` (default: the fastest
    available); the prepared weight is cached in ``module._int_state``. The low-rank branch is
    not included (``QuantLinear.forward`` adds it).
    """
    per_tensor = _check_inputs(module, codes, a_scale, a_zero)
    st = _state(module, kernel)
    return _product(st, codes, a_scale, a_zero, per_tensor)[:, :st.out_features]


def _product(st: IntWeightState, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
             per_tensor: bool) -> torch.Tensor:
    """Float32 (M, ``st.product_features``): the outputs of every row of the prepared weight (the
    layer's N outputs, then the LoRA limb rows, which have zero bias)."""
    m, k = codes.shape
    if m == 0:
        return torch.zeros(0, st.product_features, device=codes.device)
    a_scale = a_scale.float()
    if st.kernel == "onednn":
        q = codes.to(torch.uint8)
        if per_tensor:
            y = _onednn(q, float(a_scale), int(a_zero), st, st.bias)
            if st.residual is not None:
                s = (codes.sum(dim=1, dtype=torch.float64) - k * float(a_zero)).float() * float(a_scale)
                y.addr_(s, st.residual_scaled, alpha=-1)
            return y
        # per-token: one common zero point inside the kernel, the per-token remainder outside
        zc = int(torch.round(a_zero.float().mean()))
        y = _onednn(q, 1.0, zc, st, None)
        y.addr_(a_zero.reshape(-1).float() - zc, st.rowsum_scaled, alpha=-1)
        if st.residual is not None:
            s = (codes.sum(dim=1, dtype=torch.float64) - k * a_zero.reshape(-1).double()).float()
            y.addr_(s, st.residual_scaled, alpha=-1)
        y.mul_(a_scale.reshape(-1, 1))
        if st.bias is not None:
            y.add_(st.bias)
        return y
    # int_mm: a - 128 in int8, exact corrections, then one scaling pass
    a8 = (codes.to(torch.int16) - 128).to(torch.int8)
    za8 = (a_zero.reshape(-1, 1) if not per_tensor else a_zero.reshape(1, 1)).to(torch.int64) - 128
    acc = int8_matmul_zp(a8, za8, st.w_int8, st.residual, st.rowsum)
    y = acc.float().mul_(st.wscale).mul_(a_scale.reshape(-1, 1) if not per_tensor else a_scale.reshape(()))
    if st.bias is not None:
        y.add_(st.bias)
    return y


# ----------------------------------------------------------------------------------------------
#                              Fused forward of an integer QuantLinear
# ----------------------------------------------------------------------------------------------


def int_forward(module, x: torch.Tensor, kernel: str | None = None, lora_bf16: bool | None = None) -> torch.Tensor:
    """``QuantLinear.forward`` for the integer kernels, with fewer passes over the data.

    Same result as the module's forward up to float rounding (identical activation codes): the
    codes are computed in place with the arithmetic of ``activation_codes``; the low-rank branch
    is ``(codes @ lora_down^T - a_zero * rowsum(lora_down)) * a_scale @ lora_up^T`` (no dequantized
    copy of the input) and, for per-tensor activations with the oneDNN kernel, is added in the
    kernel's epilogue.

    With ``lora_limbs`` >= 1 (the layer's attribute; default ``DEFAULT_LORA_LIMBS``) the LoRA down
    rows are part of the prepared integer weight (:func:`lora_limbs`): ONE integer product gives the
    N outputs and the limbs of the rank-r intermediate ``h = Q_A(x) lora_down^T`` (the kernel
    applies the activation zero point and the per-row scales), the limbs are summed, and the
    up-projection ``h lora_up^T`` is added in place into the output (``addmm_``). Three limbs
    reproduce the fp32 down-projection (2.4e-7 of a row's largest entry); one limb is plain int8
    per row. ``lora_limbs = 0``: the down-projection runs apart, in fp32, from the codes.

    ``lora_bf16=True`` (default: the layer's ``lora_bf16``, else False) runs the low-rank products
    that are not integer in bf16 (the up-projection; with 0 limbs also the down-projection): an
    error of a few 2^-9 of the branch, which is a small correction of the output. It is an
    approximation, hence off by default.
    """
    if lora_bf16 is None:
        lora_bf16 = bool(getattr(module, "lora_bf16", False))
    if not module.int_supported():
        raise ValueError(f"the integer backend handles per-channel weights with <= 8-bit activations, got "
                         f"layout={module.layout!r}, abits={module.abits}")
    st = _state(module, kernel)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if module.smooth is not None:
        x2 = x2 / module.smooth
    if x2.dtype != torch.float32:
        x2 = x2.float()
    a_scale, a_zero = activation_qparams(x2, module.abits, module.act_granularity, module.range_mode)
    codes = torch.div(x2, a_scale)
    codes.round_().add_(a_zero).clamp_(0, 2 ** module.abits - 1)
    lora = None
    limbs = st.lora_limbs
    if module.lora_rank and not limbs:
        if lora_bf16:
            if st.lora_bf16 is None:
                st.lora_bf16 = (module.lora_down.to(torch.bfloat16), module.lora_up.to(torch.bfloat16))
            down, up = st.lora_bf16
            h = (codes.to(torch.bfloat16) @ down.t()).float()
            h.sub_(a_zero * st.lora_down_sum).mul_(a_scale)
            lora = h.to(torch.bfloat16) @ up.t()
        else:
            h = codes @ module.lora_down.float().t()
            h.sub_(a_zero * st.lora_down_sum).mul_(a_scale)
            lora = h @ module.lora_up.float().t()
    per_tensor = a_scale.numel() == 1
    if st.kernel == "onednn" and per_tensor and st.residual is None:
        y = _onednn(codes.to(torch.uint8), float(a_scale), int(a_zero), st, st.bias, other=lora)
    else:
        y = _product(st, codes, a_scale, a_zero, per_tensor)
        if lora is not None:
            y.add_(lora)
    if limbs:
        n, r = st.out_features, st.lora_rank
        h = y[:, n:n + r]
        for j in range(1, limbs):
            h = h + y[:, n + j * r:n + (j + 1) * r]
        y = y[:, :n]  # a view: the up-projection accumulates into it, no copy
        if lora_bf16:
            if st.lora_up_bf16 is None:
                st.lora_up_bf16 = module.lora_up.to(torch.bfloat16).t()
            y.add_(h.to(torch.bfloat16) @ st.lora_up_bf16)
        else:
            y.addmm_(h, module.lora_up.float().t())  # bf16 factors: a (N, r) conversion per call
    return y.reshape(*shape[:-1], module.out_features).to(x.dtype)

