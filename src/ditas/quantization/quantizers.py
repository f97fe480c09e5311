"""Uniform affine quantizers: weight codes with their scales and zero points, activation codes.

Two range conventions:

- ``"levels"`` (ours): ``scale = (max - min) / (2^b - 1)``, so both ends of the range are
  representable;
- ``"reference"`` (the published DiTAS code): ``scale = (max - min) / 2^b``, which clips the top of
  every range by one step. Used only by the faithful ``paper`` recipe.

Every quantizer here returns integer *codes* in ``[0, 2^b - 1]`` plus the scale and integer zero
point that dequantize them as ``(code - zero) * scale``; fake quantization is that composition.
Activation granularities: ``tensor`` (one range), ``token`` (one per row), ``group`` (one per
``group_size`` consecutive input channels of a row: ``token`` over the grouped view).

Number formats (``FORMATS``): ``int`` (the above) and the FP4 block formats of ``fp4.py``
(``nvfp4``, ``mxfp4``). :func:`weight_quantizer` and :func:`activation_quantizer` give the one
function per format that the search, the LoRA fits and ``QuantLinear`` all call.

Weight layouts (how scales are shared):

- ``"channel"``: one scale per output row; ``wscale``/``wzero`` have shape (out, 1);
- ``"group"``: groups of ``group_size`` consecutive input columns within a row; (out, in/G);
- ``"reference32"``: the published code's grouping: the row-major flattened weight viewed as
  (32, numel/32) with min/max over the first axis, i.e. 32 elements of one input column whose rows
  are out/32 apart; ``wscale``/``wzero`` have shape (out/32, in).
"""

from __future__ import annotations

import torch

from .fp4 import FP4_BLOCKS, dequantize_fp4, fake_quant_fp4, quantize_dequantize_fp4, quantize_fp4

WEIGHT_LAYOUTS = ("channel", "group", "reference32")
RANGE_MODES = ("levels", "reference")
ACT_GRANULARITIES = ("tensor", "token", "group")
FORMATS = ("int", *FP4_BLOCKS)  # number formats of weights and activations (``fp4``: the FP4 ones)
DEFAULT_ACT_GROUP = 64  # input channels per scale of group-wise INT activations
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
                          range_mode: str = "levels", group_size: int = DEFAULT_ACT_GROUP) -> torch.Tensor:
    """Quantize-dequantize; 16 bits or more means the activation stays in floating point.
    ``group``: per-token quantization of the (..., K / group_size, group_size) view."""
    if bits >= 16:
        return x
    if granularity == "group":
        k = x.shape[-1]
        if group_size < 1 or k % group_size:
            raise ValueError(f"activation group size {group_size} does not divide the input width {k}")
        g = x.reshape(*x.shape[:-1], k // group_size, group_size)
        return fake_quant_activation(g, bits, "token", range_mode).reshape(x.shape)
    codes, scale, zero = activation_codes(x, bits, granularity, range_mode)
    return ((codes - zero) * scale).to(x.dtype)


# ----------------------------------------------------------------------------------------------
#                               One function per format
# ----------------------------------------------------------------------------------------------


def weight_quantizer(fmt):
    """The quantizer of a ``WeightFormat``: float (out, in) -> ((codes, scale, third), dequantized).

    ``third`` is the integer zero point (``int``), the fp32 tensor scale (``nvfp4``) or None
    (``mxfp4``); ``QuantLinear`` stores it as ``wzero`` / ``wtscale`` / nothing."""
    if fmt.format in FP4_BLOCKS:
        return lambda w: quantize_dequantize_fp4(w, fmt.format)
    return lambda w: quantize_dequantize_weight(w, fmt.bits, fmt.layout, fmt.group_size, fmt.range_mode)


def quantize_weight_as(w: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The codes of ``w`` in a ``WeightFormat`` (the first half of :func:`weight_quantizer`)."""
    if fmt.format in FP4_BLOCKS:
        return quantize_fp4(w, fmt.format)
    return quantize_weight(w, fmt.bits, fmt.layout, fmt.group_size, fmt.range_mode)


def dequantize_weight_as(codes: torch.Tensor, scale: torch.Tensor, third: torch.Tensor | None, fmt) -> torch.Tensor:
    """The float weight of codes in a ``WeightFormat`` (``third`` as :func:`weight_quantizer` says)."""
    if fmt.format in FP4_BLOCKS:
        return dequantize_fp4(codes, scale, third)
    return dequantize_weight(codes, scale, third, fmt.layout, fmt.group_size)


def activation_quantizer(fmt):
    """The fake quantizer of an ``ActivationFormat``: ``q(x, amax=None)`` in ``x``'s dtype.

    ``amax`` (nvfp4 only): the max |x| of the whole batch for the tensor scale, when ``x`` is a
    subsample of its tokens (the search); the other formats have no use for it."""
    if fmt.bits >= 16:
        return lambda x, amax=None: x
    if fmt.format in FP4_BLOCKS:
        return lambda x, amax=None: fake_quant_fp4(x, fmt.format, amax)
    return lambda x, amax=None: fake_quant_activation(x, fmt.bits, fmt.granularity, fmt.range_mode, fmt.group_size)
