"""What the integer kernels (``int_mm``, ``onednn``) share: the prepared weight and the fused forward.

An integer kernel quantizes the layer's input to codes ``a`` with scale ``s_a`` and zero point
``z_a`` and computes

    y = s_a * s_w * sum_k (a_k - z_a) (q_k - z_w) + bias

for weight codes ``q``, per-output-channel scale ``s_w`` and zero point ``z_w``. The sum is
evaluated exactly in integers; only the final scaling is floating point, so the result equals
the simulated kernel ``F.linear((a - z_a) s_a, (q - z_w) s_w, bias)`` up to float rounding.

Weight preparation (:meth:`IntegerKernel.prepare`, once per layer, held by the layer as its
``kernel_state``; built from ``qweight``; no float copy of the weight is ever made). Each row gets
an integer shift ``t`` with ``q - t`` in int8: ``t = z_w`` whenever that fits (always for <= 7-bit
codes whose zero point lies within about 128 of the codes, i.e. the usual case), otherwise the
nearest value that fits. The stored weight ``w = q - t`` is then symmetric (zero point 0) except
for a residual zero point ``r = z_w - t`` on the rare rows that needed it, corrected with the
per-token sums of ``a - z_a``. Each kernel says how it stores ``w`` (:meth:`IntegerKernel.pack`)
and computes the product (:meth:`IntegerKernel.product`); preparing validates the scales and zero
points (``validate.quant_params_problem``), so no kernel turns a bad value into garbage.

:meth:`IntegerKernel.forward` quantizes the input with the same arithmetic as
``quantizers.activation_codes`` but in place, computes the low-rank branch from the codes (no
dequantized copy of the input) and lets the kernel fuse it where it can (:meth:`IntegerKernel.fused`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError
from ..quantizers import activation_qparams
from .base import Kernel, cached, weights_problem

LIMB_BASE = 128  # each further int8 limb of the LoRA down rows adds 7 bits
MAX_LORA_LIMBS = 3  # three limbs already match the fp32 product (2.4e-7 of a row's largest entry)
DEFAULT_LORA_LIMBS = 3


@dataclass
class IntWeightState:
    """What an integer kernel needs of a layer, derived from ``qweight``/``wscale``/``wzero``/``bias``.

    ``w_int8`` is ``qweight - shift`` (N, K) int8 (None once handed to oneDNN, which keeps its own
    packed copy in ``packed``); ``shift`` (N,) int64 gives the codes back exactly
    (:meth:`codes`); ``residual`` is ``wzero - shift`` (N,) int64, or None when it is
    zero for every row; ``rowsum`` the int64 row sums of ``w_int8``. ``wscale`` (N,) float32,
    ``rowsum_scaled = rowsum * wscale`` and ``residual_scaled = residual * wscale`` serve the
    float epilogues.
    """

    entry: "IntegerKernel"  # the kernel that prepared it
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
    def kernel(self) -> str:
        """The name of the kernel that prepared this state."""
        return self.entry.name

    @property
    def product_features(self) -> int:
        """Columns of the integer product: the N outputs, then ``lora_limbs * lora_rank`` LoRA rows."""
        return self.out_features + self.lora_limbs * self.lora_rank

    def codes(self) -> torch.Tensor:
        """The uint8 weight codes (N, K) this state was prepared from, re-derived exactly."""
        w = self.entry.unpack(self)
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


class IntegerKernel(Kernel):
    """The part every integer kernel shares; a kernel adds ``pack``, ``unpack`` and ``product``."""

    layouts = ("channel",)
    max_abits = 8
    holds_codes = True

    def pack(self, w_int8: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The prepared (N, K) int8 weight as the kernel keeps it: (w_int8 or None, packed or None)."""
        raise NotImplementedError

    def unpack(self, st: IntWeightState) -> torch.Tensor:
        """The (rows, K) int8 weight of a prepared state, exactly."""
        raise NotImplementedError

    def product(self, st: IntWeightState, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
                per_tensor: bool) -> torch.Tensor:
        """Float32 (M, ``st.product_features``) for M > 0 rows of codes: the outputs of every row of
        the prepared weight (the layer's N outputs, then the LoRA limb rows, which have zero bias)."""
        raise NotImplementedError

    def fused(self, st: IntWeightState, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
              lora: torch.Tensor | None) -> torch.Tensor | None:
        """The product with ``lora`` (M, N) added inside the kernel, or None where it cannot."""
        return None

    def prepare(self, module: Any) -> IntWeightState:
        """Builds the integer weight state of a per-channel ``QuantLinear`` (see the module docstring).

        With a LoRA branch, its down-projection rows as ``module.lora_limbs`` int8 limbs
        (:func:`lora_limbs`) appended to the weight, so one integer product yields the output and
        the rank-r intermediate; 0 keeps them apart. Refuses scales and zero points that would give
        garbage (``ConfigError``).
        """
        limbs = getattr(module, "lora_limbs", DEFAULT_LORA_LIMBS)
        if not isinstance(limbs, int) or not 0 <= limbs <= MAX_LORA_LIMBS:
            raise ConfigError(f"lora limbs must be an integer in 0..{MAX_LORA_LIMBS}, got {limbs!r}")
        if module.weight_format.layout != "channel":
            raise ConfigError(f"the integer kernels need per-channel weights, got layout {module.weight_format.layout!r}")
        problem = weights_problem(module)
        if problem:
            raise ConfigError(f"kernel {self.name!r} {problem}")
        q = module.qweight
        n, k = q.shape
        if q.dtype != torch.uint8:
            raise ConfigError(f"qweight must be uint8 codes, got {q.dtype}")
        if module.wscale.shape != (n, 1) or module.wzero.shape != (n, 1):
            raise ConfigError(f"per-channel wscale/wzero must be ({n}, 1), got {tuple(module.wscale.shape)} and "
                             f"{tuple(module.wzero.shape)}")
        zero = module.wzero.reshape(-1)
        if not torch.equal(zero, torch.round(zero)):
            raise ConfigError("wzero must hold integers")
        qmax = 2 ** module.weight_format.bits - 1
        if n and k and int(q.max()) > qmax:
            raise ConfigError(f"qweight holds codes above {qmax} for {module.weight_format.bits}-bit weights")
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
        w_int8, packed = self.pack(w_int8)
        return IntWeightState(entry=self, in_features=k, out_features=n, w_int8=w_int8, packed=packed, rowsum=rowsum,
                              residual=residual, wscale=wscale, rowsum_scaled=rowsum.float() * wscale,
                              residual_scaled=None if residual is None else residual.float() * wscale, bias=bias,
                              zero_points=torch.zeros(rows, dtype=torch.int64, device=q.device),
                              lora_down_sum=module.lora_down.float().sum(dim=1) if rank and not limbs else None,
                              shift=shift,
                              lora_limbs=limbs, lora_rank=rank)

    def state(self, module: Any) -> IntWeightState:
        """The layer's prepared state for this kernel: its own (prepared again if its
        ``lora_limbs`` changed) when the layer runs this kernel, else a temporary one."""
        st = module.kernel_state
        limbs = getattr(module, "lora_limbs", DEFAULT_LORA_LIMBS) if module.lora_rank else 0
        if isinstance(st, IntWeightState) and st.entry is self and st.lora_limbs == limbs:
            return st
        if module.kernel == self.name:
            module.prepare_kernel()
            return module.kernel_state
        return self.prepare(module)

    @staticmethod
    def _check_inputs(module, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor) -> bool:
        """Validates shapes; returns True for per-tensor activation parameters."""
        abits = module.active_activation_format.bits
        if module.weight_format.layout != "channel" or abits > 8:
            raise ConfigError(f"the integer kernels handle per-channel weights with <= 8-bit activations, got "
                             f"layout={module.weight_format.layout!r}, abits={abits}")
        if codes.ndim != 2 or codes.shape[1] != module.in_features:
            raise ConfigError(f"codes must be (M, {module.in_features}), got {tuple(codes.shape)}")
        m = codes.shape[0]
        per_tensor = a_scale.numel() == 1
        if per_tensor != (a_zero.numel() == 1) or (not per_tensor and (a_scale.numel() != m or a_zero.numel() != m)):
            raise ConfigError(f"a_scale/a_zero must both be scalars or both (M, 1) = ({m}, 1), got "
                             f"{tuple(a_scale.shape)} and {tuple(a_zero.shape)}")
        return per_tensor

    def linear(self, module: Any, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor) -> torch.Tensor:
        """Float32 (M, out) = ``(codes - a_zero) a_scale @ ((qweight - wzero) wscale)^T + bias``.

        ``codes`` (M, in) holds integers in ``[0, 2^abits - 1]`` (float or integer dtype, as
        ``activation_codes`` returns them); ``a_scale``/``a_zero`` are scalars (per-tensor) or
        (M, 1) (per-token). The low-rank branch is not included (``forward`` adds it).
        """
        per_tensor = self._check_inputs(module, codes, a_scale, a_zero)
        st = self.state(module)
        return self._product(st, codes, a_scale, a_zero, per_tensor)[:, :st.out_features]

    def _product(self, st: IntWeightState, codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
                 per_tensor: bool) -> torch.Tensor:
        if codes.shape[0] == 0:
            return torch.zeros(0, st.product_features, device=codes.device)
        return self.product(st, codes, a_scale.float(), a_zero, per_tensor)

    def forward(self, module: Any, x: torch.Tensor, lora_bf16: bool | None = None) -> torch.Tensor:
        """``QuantLinear``'s forward on an integer kernel, with fewer passes over the data.

        Same result as the module's forward up to float rounding (identical activation codes): the
        codes are computed in place with the arithmetic of ``activation_codes``; the low-rank branch
        is ``(codes @ lora_down^T - a_zero * rowsum(lora_down)) * a_scale @ lora_up^T`` (no dequantized
        copy of the input) and, where the kernel can (:meth:`fused`), is added in its epilogue.

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
        st = self.state(module)
        shape = x.shape
        x2 = module.transform_input(x.reshape(-1, shape[-1]))
        if x2.dtype != torch.float32:
            x2 = x2.float()
        a = module.active_activation_format
        a_scale, a_zero = activation_qparams(x2, a.bits, a.granularity, a.range_mode)
        codes = torch.div(x2, a_scale)
        codes.round_().add_(a_zero).clamp_(0, 2 ** a.bits - 1)
        lora = None
        limbs = st.lora_limbs
        if module.lora_rank and not limbs:
            if lora_bf16:
                down, up = cached(st, "lora_bf16", lambda: (module.lora_down.to(torch.bfloat16),
                                                            module.lora_up.to(torch.bfloat16)))
                h = (codes.to(torch.bfloat16) @ down.t()).float()
                h.sub_(a_zero * st.lora_down_sum).mul_(a_scale)
                lora = h.to(torch.bfloat16) @ up.t()
            else:
                h = codes @ module.lora_down.float().t()
                h.sub_(a_zero * st.lora_down_sum).mul_(a_scale)
                lora = h @ module.lora_up.float().t()
        per_tensor = a_scale.numel() == 1
        y = self.fused(st, codes, a_scale, a_zero, lora) if codes.shape[0] else None
        if y is None:
            y = self._product(st, codes, a_scale, a_zero, per_tensor)
            if lora is not None:
                y.add_(lora)
        if limbs:
            n, r = st.out_features, st.lora_rank
            h = y[:, n:n + r]
            for j in range(1, limbs):
                h = h + y[:, n + j * r:n + (j + 1) * r]
            y = y[:, :n]  # a view: the up-projection accumulates into it, no copy
            if lora_bf16:
                up_t = cached(st, "lora_up_bf16", lambda: module.lora_up.to(torch.bfloat16).t())
                y.add_(h.to(torch.bfloat16) @ up_t)
            else:
                y.addmm_(h, module.lora_up.float().t())  # bf16 factors: a (N, r) conversion per call
        return y.reshape(*shape[:-1], module.out_features).to(x.dtype)

    def describe(self, module: Any) -> list[str]:
        if not module.lora_rank:
            return []
        return [f"lora_down=int8x{module.lora_limbs}" if module.lora_limbs else "lora_down=fp32"]
