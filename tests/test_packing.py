"""Packing of integer codes: bit-exact round trips, the documented layout, size and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditas.quantization.packing import pack_codes, packed_numel, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), shape=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 31 - 1))
def test_round_trip_is_bit_exact(bits: int, shape: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == math.ceil(codes.numel() * bits / 8) == packed_numel(codes.numel(), bits)
    back = unpack_codes(packed, bits, codes.shape)
    assert back.dtype == torch.uint8 and back.shape == codes.shape
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_weight_sized_odd_shapes(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for shape in [(1,), (3, 5), (17, 33), (96, 1153)]:
        codes = torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.uint8)
        codes.view(-1)[0] = 2 ** bits - 1  # extremes present
        codes.view(-1)[-1] = 0
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, shape), codes)


def test_layout_4bit_low_nibble_first() -> None:
    codes = torch.tensor([1, 2, 3, 4, 15], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0x43, 0x0F]


def test_layout_2bit_and_3bit_stream() -> None:
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b11]
    # 3-bit codes 5, 6, 7 -> stream bits (LSB first) 101 011 111 -> byte0 = 0b11110101, byte1 = 0b1
    assert pack_codes(torch.tensor([5, 6, 7], dtype=torch.uint8), 3).tolist() == [0b11110101, 0b1]


def test_8bit_is_identity_bytes() -> None:
    codes = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    assert torch.equal(pack_codes(codes, 8), codes.reshape(-1))


def test_other_integer_dtypes_accepted() -> None:
    codes = torch.tensor([[0, 7], [3, 5]], dtype=torch.int64)
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, (2, 2)), codes.to(torch.uint8))


def test_empty() -> None:
    packed = pack_codes(torch.zeros(0, 4, dtype=torch.uint8), 4)
    assert packed.numel() == 0
    assert unpack_codes(packed, 4, (0, 4)).shape == (0, 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 7])
def test_out_of_range_codes_rejected(bits: int) -> None:
    codes = torch.zeros(10, dtype=torch.uint8)
    codes[3] = 2 ** bits
    with pytest.raises(ValueError, match="must lie in"):
        pack_codes(codes, bits)
    with pytest.raises(ValueError, match="must lie in"):
        pack_codes(torch.tensor([0, -1]), bits)


@pytest.mark.parametrize("bad", [0, 1.5, 9, True])
def test_bad_bits_rejected(bad) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), bad)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), bad, (4,))


def test_float_codes_rejected() -> None:
    with pytest.raises(ValueError, match="integer tensor"):
        pack_codes(torch.zeros(4), 4)


def test_wrong_packed_length_rejected() -> None:
    packed = pack_codes(torch.ones(9, dtype=torch.uint8), 4)  # 5 bytes
    with pytest.raises(ValueError, match="need 5 packed bytes, got 4"):
        unpack_codes(packed[:4], 4, (9,))
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_codes(packed, 4, (3, 4))


def test_nonzero_padding_bits_rejected() -> None:
    packed = pack_codes(torch.ones(9, dtype=torch.uint8), 4)
    packed[-1] |= 0xF0
    with pytest.raises(ValueError, match="padding bits"):
        unpack_codes(packed, 4, (9,))


def test_packed_must_be_1d_uint8() -> None:
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_codes(torch.zeros(2, 2, dtype=torch.uint8), 4, (8,))
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_codes(torch.zeros(4, dtype=torch.int8), 4, (8,))
