"""Attention cores of lower precision, an option of a (quantized) model: ``use_attention``.

The four linears of a DiT block run on the integer kernels; the attention between them
(``softmax(Q K^T / sqrt(d)) V``) is, by default, fp32 ``scaled_dot_product_attention``. This
module offers two cheaper cores, swapped into the model's attention modules (found through the
family's adapter, ``ModelAdapter.attention_modules``) by one explicit call::

    from ditas.quantization.attention import use_attention
    use_attention(model, "int8")        # or "bf16"; "fp32" puts the default back

- ``"fp32"``: ``F.scaled_dot_product_attention`` in the input's precision (the default; exact).
- ``"bf16"``: ``F.scaled_dot_product_attention`` on bf16 copies of Q, K, V, output back in fp32.
- ``"int8"``: the SageAttention design (Zhang et al. 2024): K is smoothed by subtracting its mean
  over tokens (softmax is invariant to adding one constant per query row, and ``q . mean(k)`` is
  such a constant), Q and K are quantized to int8 per token (symmetric, scale ``amax / 127``),
  ``Q K^T`` is an int8 x int8 -> int32 product (``torch._int_mm``), dequantized by the outer
  product of the two scale vectors, softmax runs in fp32, and ``P V`` in bf16 (fp32 accumulation).
  The score matrix is produced a few heads at a time (``heads_per_chunk``), so that it stays in
  cache between the product, the softmax and ``P V``.

None of these changes the weights or the checkpoint; the choice lives on the model object only
(``model.attention_mode``), so it is made again after every load. Measured speed and quality are
in docs/performance.md ("Attention"); the method's default stays ``"fp32"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["ATTENTION_MODES", "AttentionCore", "check_attention_mode", "int8_attention", "int8_scores",
           "quantize_per_token", "use_attention"]

ATTENTION_MODES = ("fp32", "bf16", "int8")
_HEADS_PER_CHUNK = 4  # 4 heads x 256 x 256 fp32 scores = 1 MiB: stays in L2 through softmax and P V


def check_attention_mode(mode: str, name: str = "attention") -> None:
    """``ConfigError`` naming ``name`` (an option, e.g. ``--attention``) unless ``mode`` is one of
    ``ATTENTION_MODES``."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"{name} must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x`` per row of its last dimension: ``(codes, scale)`` with
    ``x ~ codes * scale``, ``scale = amax|x| / 127`` of shape ``(..., 1)`` (1 for an all-zero row)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().div_(127.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.div(x.float(), scale).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b`` of int8 matrices: the custom op ``ditas::int_mm`` (``torch._int_mm``,
    padded where a device needs it, traceable) where it is exact; on a CPU without VNNI (where it
    saturates, ``kernels.int_mm.int_mm_exact_on_cpu``) a float product, exact too: each product is
    at most 2^14, so every partial sum of K <= 1024 of them fits float32's 24 bits (float64's 53 beyond)."""
    from .kernels import ops
    from .kernels.int_mm import int_mm_exact_on_cpu

    if a.device.type == "cpu" and not int_mm_exact_on_cpu():
        dtype = torch.float32 if a.shape[1] <= 1024 else torch.float64
        return (a.to(dtype) @ b.to(dtype)).to(torch.int32)
    return ops.int_mm(a, b)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` in row-major storage with the canonical strides even along size-1 dimensions:
    ``torch._int_mm`` reads ``stride(0)`` as the leading dimension, and ``.contiguous()`` keeps
    e.g. a (1, N) view with strides (1, 1) as it is, which it then misreads (found by the tests)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def int8_scores(q8: torch.Tensor, k8: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``q8 @ k8^T`` for int8 (G, N, D) and (G, M, D): (G, N, M), one integer GEMM per slice."""
    g = q8.shape[0]
    q8 = _dense(q8)
    k8t = _dense(k8.transpose(1, 2))
    out = torch.empty(g, q8.shape[1], k8.shape[1], dtype=torch.int32, device=q8.device)
    for i in range(g):
        out[i] = _int_mm(q8[i], k8t[i])
    return out


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   heads_per_chunk: int = _HEADS_PER_CHUNK) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` with ``Q K^T`` on int8 codes (see the module docstring).

    ``q``, ``k``, ``v``: (..., N, D) (leading dimensions: batch and heads). Returns the input's
    dtype. The error against fp32 attention is about 1e-2 relative on random inputs (tested).
    """
    *lead, n, d = q.shape
    m = k.shape[-2]
    k = k - k.mean(dim=-2, keepdim=True)
    q8, sq = quantize_per_token(q)
    k8, sk = quantize_per_token(k)
    g = q8.numel() // (n * d) if n * d else 0
    q8, k8 = q8.reshape(g, n, d), k8.reshape(g, m, d)
    row = sq.reshape(g, n, 1).mul_(d ** -0.5)
    col = sk.reshape(g, 1, m)
    vb = v.reshape(g, m, v.shape[-1]).to(torch.bfloat16)
    out = torch.empty(g, n, v.shape[-1], dtype=q.dtype, device=q.device)
    for s in range(0, g, heads_per_chunk):
        e = min(g, s + heads_per_chunk)
        scores = int8_scores(q8[s:e], k8[s:e]).float().mul_(row[s:e]).mul_(col[s:e])
        p = torch.softmax(scores, dim=-1).to(torch.bfloat16)
        out[s:e] = torch.bmm(p, vb[s:e])
    return out.reshape(*lead, n, v.shape[-1])


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention`` on bf16 copies, returned in the input's dtype."""
    return F.scaled_dot_product_attention(q.to(torch.bfloat16), k.to(torch.bfloat16),
                                          v.to(torch.bfloat16)).to(q.dtype)


class AttentionCore(nn.Module):
    """``softmax(Q K^T / sqrt(d)) V`` of (B, heads, N, D) tensors, in the precision ``mode``.

    No parameters: a model's state dict is the same with any core."""

    def __init__(self, mode: str = "fp32"):
        super().__init__()
        check_attention_mode(mode)
        self.mode = mode

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8":
            return int8_attention(q, k, v)
        if self.mode == "bf16":
            return bf16_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def use_attention(model: nn.Module, mode: str) -> nn.Module:
    """Sets the attention core of every attention module of ``model`` to ``mode`` (in place).

    ``mode``: ``"fp32"`` (the default, ``scaled_dot_product_attention`` as the model was built),
    ``"bf16"`` or ``"int8"`` (see the module docstring). Raises ``ConfigError`` for an unknown mode
    or for a model family whose attention cannot be replaced (any mode but ``"fp32"``). Returns
    ``model``; ``model.attention_mode`` records the choice.
    """
    from ..model.adapters.registry import adapter_for

    check_attention_mode(mode)
    try:
        modules = adapter_for(model).attention_modules()
    except ConfigError:
        modules = None
    if not modules:
        if mode != "fp32":
            raise ConfigError(f"attention={mode!r} is not available for a {type(model).__name__} "
                              "(only ditas' DiT has a replaceable attention core)")
        return model
    for module in modules:
        module.core = None if mode == "fp32" else AttentionCore(mode)
    model.attention_mode = mode
    return model
