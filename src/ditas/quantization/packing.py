"""Bit packing of integer codes for storage: ``bits``-bit codes in ``ceil(n * bits / 8)`` bytes.

Layout (one rule for every width): the codes, flattened in row-major order, form a little-endian
bitstream. Code ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant bit
first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. The unused high bits of the last
byte are zero. Consequences:

- 4 bits: byte ``j`` holds code ``2j`` in its low nibble and code ``2j + 1`` in its high nibble;
- 2 bits: byte ``j`` holds codes ``4j .. 4j + 3`` from the low bits up;
- 8 bits: the bytes are the codes;
- 3, 5, 6, 7 bits: codes straddle byte boundaries (a dense bitstream, no padding per code).

Widths that divide 8 take a direct shift-and-or path; the others expand the codes to single
bits and regroup them into bytes (``bits`` bytes of scratch per code), both fully vectorized. The
shape is not stored: the caller keeps it (a checkpoint stores it next to the packed bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pack_codes", "unpack_codes", "packed_numel"]

_MIN_BITS, _MAX_BITS = 1, 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not _MIN_BITS <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be an integer in {_MIN_BITS}..{_MAX_BITS}, got {bits!r}")


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` codes of ``bits`` bits pack into: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def _bit_weights(n: int, device: torch.device) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones(n, dtype=torch.uint8, device=device),
                                    torch.arange(n, dtype=torch.uint8, device=device))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes in ``[0, 2^bits - 1]`` (any shape, any integer dtype) into uint8 bytes.

    Returns a 1-D uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes on the codes' device.
    Raises ``ValueError`` for a bad width, a non-integer tensor or a code out of range.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor (uint8), got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    device = flat.device
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 2 ** bits:
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits}-bit packing, "
                         f"found values in [{lo}, {hi}]")
    flat = flat.to(torch.uint8)
    nbytes = packed_numel(n, bits)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        pad = nbytes * per - n
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        groups = flat.view(nbytes, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
        shifted = torch.bitwise_left_shift(groups, shifts)
        out = shifted[:, 0].clone()
        for i in range(1, per):  # at most 7 column ORs, not a loop over elements
            out |= shifted[:, i]
        return out
    # 3, 5, 6, 7 bits: expand to a bitstream, then regroup by 8
    stream = torch.bitwise_and(torch.bitwise_right_shift(flat[:, None], _bit_arange(bits, device)), 1)
    stream = stream.reshape(-1)
    pad = nbytes * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.view(nbytes, 8) * _bit_weights(8, device)).sum(dim=1, dtype=torch.uint8)


def _bit_arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8, device=device)


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of ``shape`` from the packed bytes.

    Raises ``ValueError`` if ``packed`` is not a 1-D uint8 tensor of exactly
    ``ceil(prod(shape) * bits / 8)`` bytes, or if its unused padding bits are not zero (a sign of
    a wrong width or shape).
    """
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.ndim != 1:
        what = f"{packed.dtype} tensor with {packed.ndim} dims" if isinstance(packed, torch.Tensor) \
            else type(packed).__name__
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {what}")
    try:
        shape = torch.Size(tuple(int(s) for s in shape))
    except (TypeError, ValueError) as e:
        raise ValueError(f"shape must be a sequence of integers, got {shape!r}") from e
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
    n = shape.numel()
    expected = packed_numel(n, bits)
    if packed.numel() != expected:
        raise ValueError(f"{n} codes of {bits} bits need {expected} packed bytes, got {packed.numel()} "
                         f"(wrong shape or bit width?)")
    device = packed.device
    if n == 0:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    spare = expected * 8 - n * bits
    if spare and int(packed[-1]) >> (8 - spare):
        raise ValueError(f"the last packed byte has non-zero padding bits (value {int(packed[-1])}): "
                         f"the data does not match {n} codes of {bits} bits")
    if bits == 8:
        return packed.clone().view(shape)
    mask = 2 ** bits - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
        codes = torch.bitwise_and(torch.bitwise_right_shift(packed[:, None], shifts), mask)
        return codes.reshape(-1)[:n].reshape(shape)
    stream = torch.bitwise_and(torch.bitwise_right_shift(packed[:, None], _bit_arange(8, device)), 1)
    stream = stream.reshape(-1)[: n * bits].view(n, bits)
    codes = (stream * _bit_weights(bits, device)).sum(dim=1, dtype=torch.uint8)
    return codes.reshape(shape)
