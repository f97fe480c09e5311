"""FP4 (E2M1) block formats, simulated exactly: NVFP4 and MXFP4.

An E2M1 number has a sign bit, two exponent bits and one mantissa bit; its magnitudes are
``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (``E2M1_VALUES``). A code here is the 4-bit pattern
``sign << 3 | magnitude index`` (uint8 0..15; a value that rounds to zero gets code 0, never -0).
Rounding is to the nearest grid value, ties to the even magnitude index (the even mantissa bit),
saturating at 6, as the OCP MX spec converts.

Both formats share one scale per *block* of consecutive elements along the last axis (the input
channels of a weight row or of an activation row):

- ``nvfp4``: blocks of 16; the block scale is an FP8-E4M3 number and one fp32 *tensor scale*
  ``g = amax(|x|) / (6 * 448)`` makes the block scales fit E4M3's range: block scale
  ``e4m3(amax_block / (6 g))``, element ``x / (block_scale * g)`` rounded to E2M1. A block whose
  scale is 0 (all zeros, or below E4M3's smallest subnormal) gets scale 1.0 instead, so its codes
  are 0 and no scale is ever 0 (as NVIDIA's Model Optimizer does); an all-zero tensor gets g = 1.
- ``mxfp4``: blocks of 32; the block scale is a power of two ``2^e`` stored as E8M0 (the byte
  ``e + 127``) with the OCP MX spec's shared exponent ``e = floor(log2(amax_block)) - 2`` (2: the
  largest E2M1 exponent), clamped to E8M0's -127..127 (an all-zero block gets 2^-127).

Dequantized element: ``value(code) * block_scale`` (times ``g`` for nvfp4, the product
``block_scale * g`` taken once in fp32, as the quantizer divides by it). Stored: codes packed 2
per byte, block scales as their uint8 bit patterns (:func:`encode_block_scales`), ``g`` as fp32.
"""

from __future__ import annotations

import torch

FP4_BLOCKS = {"nvfp4": 16, "mxfp4": 32}  # format -> block size along the input channels
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of E2M1's largest power of two (4 = 2^2): the MX spec's emax_elem
E4M3_MAX = 448.0
E8M0_BIAS = 127


def block_size(fmt: str) -> int:
    """The block size of an FP4 format (``ValueError`` for another name)."""
    if fmt not in FP4_BLOCKS:
        raise ValueError(f"FP4 format must be one of {tuple(FP4_BLOCKS)}, got {fmt!r}")
    return FP4_BLOCKS[fmt]


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """``v`` (already divided by its scale) rounded to the E2M1 grid: to nearest, ties to even,
    saturating at 6; a zero result is +0.

    The grid's spacing is 0.5 below 2, 1 below 4 and 2 up to 6, and ``v / spacing`` has the parity
    of the E2M1 code, so ``torch.round`` (half to even) on it rounds ties to the even code, also
    across a binade (1.75 -> 2, 3.5 -> 4). A few elementwise passes (the activations of every
    FP4 forward go through here)."""
    m = v.abs().clamp_(max=E2M1_MAX)
    step = torch.where(m < 2, 0.5, torch.where(m < 4, 1.0, 2.0)).to(m.dtype)
    q = m.div_(step).round_().mul_(step)
    return torch.where(v < 0, -q, q).add_(0.0)  # -0.0 + 0.0 = +0.0


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes of ``v`` (already divided by its scale): :func:`e2m1_round`'s values as
    ``sign << 3 | magnitude index``."""
    r = e2m1_round(v)
    m = r.abs()
    mag = torch.where(m < 2, m * 2, torch.where(m < 4, m + 2, m / 2 + 4)).to(torch.uint8)
    return mag | ((r < 0).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of uint8 E2M1 codes."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def _scaled_blocks(x: torch.Tensor, fmt: str, amax: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(blocked ``x`` divided by its scales, block scales, tensor scale or None, the full scale
    ``block_scale * g`` per block) of :func:`quantize_fp4`."""
    xb = _blocks(x, block_size(fmt))
    g = None
    if fmt == "nvfp4":
        g = tensor_scale(xb.abs().amax() if amax is None else amax).to(xb.device)
    scales = block_scales(xb, fmt, g)
    full = scales if g is None else scales * g
    return xb / full[..., None], scales, g, full


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (..., K) as (..., K / block, block) in fp32."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"FP4 blocks of {block} do not divide the input width {k}")
    return x.float().reshape(*x.shape[:-1], k // block, block)


def tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 tensor scale ``amax / (6 * 448)`` as a (1,) tensor (1.0 for an all-zero tensor)."""
    g = amax.float().reshape(1) / (E2M1_MAX * E4M3_MAX)
    return torch.where(g > 0, g, torch.ones_like(g))


def block_scales(xb: torch.Tensor, fmt: str, g: torch.Tensor | None) -> torch.Tensor:
    """The decoded block scales (fp32, exactly E4M3 / E8M0 values) of blocked ``xb`` (..., nb, block)."""
    amax = xb.abs().amax(dim=-1)
    if fmt == "nvfp4":
        s = (amax / (E2M1_MAX * g)).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
        return torch.where(s > 0, s, torch.ones_like(s))
    exponent = torch.frexp(amax).exponent.to(torch.int32) - 1  # floor(log2(amax)) exactly; amax = 0 -> -1
    e = torch.where(amax > 0, exponent - E2M1_EMAX, torch.full_like(exponent, -E8M0_BIAS))
    return torch.ldexp(torch.ones_like(amax), e.clamp_(-E8M0_BIAS, E8M0_BIAS))


def quantize_fp4(x: torch.Tensor, fmt: str, amax: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes uint8 like ``x``, block scales fp32 (..., K / block), tensor scale (1,) or None).

    ``amax``: the tensor's max |x| for NVFP4's tensor scale (default: computed from ``x``; the
    search passes the full batch's while it scores a subsample of tokens).
    """
    scaled, scales, g, _ = _scaled_blocks(x, fmt, amax)
    return e2m1_codes(scaled).reshape(x.shape), scales, g


def dequantize_fp4(codes: torch.Tensor, scales: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """Float32 ``value(code) * block_scale (* g)`` in the codes' shape."""
    nb = scales.shape[-1]
    vals = e2m1_values(codes).reshape(*codes.shape[:-1], nb, codes.shape[-1] // nb)
    full = scales if g is None else scales * g
    return (vals * full[..., None]).reshape(codes.shape)


def quantize_dequantize_fp4(x: torch.Tensor, fmt: str, amax: torch.Tensor | None = None
                            ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """:func:`quantize_fp4` and :func:`dequantize_fp4` of its result (a weight quantizer's shape)."""
    codes = quantize_fp4(x, fmt, amax)
    return codes, dequantize_fp4(*codes)


def fake_quant_fp4(x: torch.Tensor, fmt: str, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize of an activation, in ``x``'s dtype: :func:`dequantize_fp4` of
    :func:`quantize_fp4`'s codes, computed from the rounded values without the codes."""
    scaled, _, _, full = _scaled_blocks(x, fmt, amax)
    return (e2m1_round(scaled) * full[..., None]).reshape(x.shape).to(x.dtype)


# -- storage ----------------------------------------------------------------------------------------


def encode_block_scales(scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """The uint8 bit patterns of decoded block scales: E4M3 (nvfp4) or the E8M0 byte ``e + 127``."""
    if fmt == "nvfp4":
        return scales.float().to(torch.float8_e4m3fn).view(torch.uint8)
    block_size(fmt)
    exponent = torch.frexp(scales.float()).exponent.to(torch.int32) - 1
    return (exponent + E8M0_BIAS).to(torch.uint8)


def decode_block_scales(bits: torch.Tensor, fmt: str) -> torch.Tensor:
    """Float32 block scales from their uint8 bit patterns (inverse of :func:`encode_block_scales`)."""
    if fmt == "nvfp4":
        return bits.view(torch.float8_e4m3fn).float()
    block_size(fmt)
    return torch.ldexp(torch.ones(bits.shape, device=bits.device), bits.to(torch.int32) - E8M0_BIAS)


def scale_bits_problem(bits: torch.Tensor, fmt: str) -> str | None:
    """Why saved uint8 block scales are not ones ditas writes (None: they are): NaN patterns
    (E4M3 0x7F/0xFF, E8M0 0xFF) or a zero / negative E4M3 scale."""
    if bits.dtype != torch.uint8:
        return f"is {bits.dtype}, expected uint8 {'E4M3' if fmt == 'nvfp4' else 'E8M0'} scale bits"
    if fmt == "mxfp4":
        return "holds the E8M0 NaN pattern 0xFF" if bool((bits == 255).any()) else None
    s = decode_block_scales(bits, fmt)
    if not bool(torch.isfinite(s).all()):
        return "holds an E4M3 NaN pattern (0x7F or 0xFF)"
    if bool((s <= 0).any()):
        return "holds E4M3 scale(s) <= 0; block scales must be positive"
    return None
