"""Uniform affine quantizers: weight codes with their scales and zero points, activation codes.

Two range conventions:

- ``"levels"`` (ours): ``scale = (max - min) / (2^b - 1)``, so both ends of the range are
  representable;
- ``"reference"`` (the published DiTAS code): ``scale = (max - min) / 2^b``, which clips the top of
  every range by one step. Used only by the faithful ``paper`` recipe.

Every quantizer here returns integer *codes* in ``[0, 2^b - 1]`` plus the scale and integer zero
point that dequantize them as ``(code - zero) * scale``; fake quantization is that composition.
Weight layouts (how scales are shared):

- ``"channel"``: one scale per output row; ``wscale``/``wzero`` have shape (out, 1);
- ``"group"``: groups of ``group_size`` consecutive input columns within a row; (out, in/G);
- ``"reference32"``: the published code's grouping: the row-major flattened weight viewed as
  (32, numel/32) with min/max over the first axis, i.e. 32 elements of one input column whose rows
  are out/32 apart; ``wscale``/``wzero`` have shape (out/32, in).
"""

from __future__ import annotations

import torch

WEIGHT_LAYOUTS = ("channel", "group", "reference32")
RANGE_MODES = ("levels", "reference")
ACT_GRANULARITIES = ("tensor", "token")
_EPS = 1e-8


def _steps(bits: int, range_mode: str) -> int:
    if range_mode not in RANGE_MODES:
        raise ValueError(f"range_mode must be one of {RANGE_MODES}, got {range_mode!r}")
    return 2 ** bits if range_mode == "reference" else 2 ** bits - 1


# ----------------------------------------------------------------------------------------------
#                                          Weights
# ----------------------------------------------------------------------------------------------


def _grouped(w: torch.Tensor, layout: str, group_size: int) -> torch.Tensor:
    """A view of ``w`` whose last axis is one quantization group."""
    out_f, in_f = w.shape
    if layout == "channel":
        return w.reshape(out_f, 1, in_f)
    if layout == "group":
        if group_size < 1 or in_f % group_size:
            raise ValueError(f"group size {group_size} does not divide the input width {in_f}")
        return w.reshape(out_f, in_f // group_size, group_size)
    if layout == "reference32":
        if out_f % 32:
            raise ValueError(f"the reference grouping needs out_features divisible by 32, got {out_f}")
        # (32, out/32, in): group (i', j) = rows i' + g*out/32, column j
        return w.reshape(32, out_f // 32, in_f).permute(1, 2, 0)
    raise ValueError(f"unknown weight layout {layout!r}; choose one of {WEIGHT_LAYOUTS}")


def _ungrouped(g: torch.Tensor, layout: str, shape: torch.Size) -> torch.Tensor:
    if layout == "reference32":
        return g.permute(2, 0, 1).reshape(shape)
    return g.reshape(shape)


def quantize_weight(w: torch.Tensor, bits: int, layout: str = "channel", group_size: int = 0,
                    range_mode: str = "levels") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of an (out, in) weight.

    Returns (codes uint8 (out, in), scale float (groups...), zero float holding integers).
    """
    codes, scale, zero = _weight_codes(w, bits, layout, group_size, range_mode)
    return _ungrouped(codes, layout, w.shape).to(torch.uint8), scale, zero


def quantize_dequantize_weight(w: torch.Tensor, bits: int, layout: str = "channel", group_size: int = 0,
                               range_mode: str = "levels"
                               ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``quantize_weight`` and ``dequantize_weight`` of its result in one go (bit-identical to the
    two calls, with fewer passes over the weight: the LoRA rounds call this 10 times per alpha)."""
    codes, scale, zero = _weight_codes(w, bits, layout, group_size, range_mode)
    q = _ungrouped(codes, layout, w.shape).to(torch.uint8)
    deq = _ungrouped(codes.sub_(zero[..., None]).mul_(scale[..., None]), layout, w.shape)
    return (q, scale, zero), deq


def _weight_codes(w: torch.Tensor, bits: int, layout: str, group_size: int, range_mode: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float codes in the grouped view, scale and zero point."""
    assert w.ndim == 2, "weights are (out_features, in_features)"
    steps = _steps(bits, range_mode)
    g = _grouped(w.float(), layout, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (torch.aminmax along a dim is ~8x slower on CPU)
    scale = ((hi - lo) / steps).clamp(min=_EPS)
    zero = torch.round(-lo / scale)
    codes = torch.div(g, scale[..., None]).round_().add_(zero[..., None]).clamp_(0, 2 ** bits - 1)
    return codes, scale, zero


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layout: str = "channel",
                      group_size: int = 0) -> torch.Tensor:
    """Float weight ``(code - zero) * scale`` in the (out, in) layout."""
    g = _grouped(codes.float(), layout, group_size)
    return _ungrouped((g - zero[..., None]) * scale[..., None], layout, codes.shape)


# ----------------------------------------------------------------------------------------------
#                                        Activations
# ----------------------------------------------------------------------------------------------


def activation_qparams(x: torch.Tensor, bits: int, granularity: str = "tensor",
                       range_mode: str = "levels") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic min/max scale and integer zero point: one per tensor, or one per token (row)."""
    if granularity == "tensor":
        lo, hi = torch.aminmax(x)
    elif granularity == "token":
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"activation granularity must be one of {ACT_GRANULARITIES}, got {granularity!r}")
    return qparams_from_range(lo, hi, bits, range_mode)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, range_mode: str = "levels"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the range [lo, hi]: what ``activation_qparams`` computes
    from a tensor's min and max. The alpha search uses it with ranges derived from per-channel
    extremes (min_j(colmin_j / s_j) is exactly the min of X / s), so it never materialises X / s
    for the range."""
    steps = _steps(bits, range_mode)
    scale = ((hi - lo).float() / steps).clamp(min=_EPS)
    zero = torch.round(-lo.float() / scale)
    return scale, zero


def quantize_activation_with(x: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Fake quantization of ``x`` with given qparams (same rounding as ``activation_codes``)."""
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
    return (codes - zero) * scale


def activation_codes(x: torch.Tensor, bits: int, granularity: str = "tensor", range_mode: str = "levels"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (float tensor holding integers in [0, 2^b - 1]), scale and zero of ``x``.

    The integer kernels and the simulated kernel both start from these codes, so they agree up to
    the order of float accumulation.
    """
    scale, zero = activation_qparams(x, bits, granularity, range_mode)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
    return codes, scale, zero


def fake_quant_activation(x: torch.Tensor, bits: int, granularity: str = "tensor",
                          range_mode: str = "levels") -> torch.Tensor:
    """Quantize-dequantize; 16 bits or more means the activation stays in floating point."""
    if bits >= 16:
        return x
    codes, scale, zero = activation_codes(x, bits, granularity, range_mode)
    return ((codes - zero) * scale).to(x.dtype)
