"""Integer kernels: exact integer core, their product vs the simulated kernel, QuantLinear int vs simulated."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ditas.errors import ConfigError
from ditas.quantization.kernels import KERNELS as REGISTRY, canonical
from ditas.quantization.kernels.int_mm import int8_matmul_zp, int_mm_exact_on_cpu
from ditas.quantization.config import ActivationFormat, WeightFormat
from ditas.quantization.linear import QuantLinear
from ditas.quantization.quantizers import activation_codes
from quant_helpers import int_forward, int_linear, integer_kernels, needs_int_kernel

KERNELS = integer_kernels()
pytestmark = pytest.mark.exactness
SHAPES = [(1, 8, 8), (3, 13, 11), (17, 24, 40), (33, 57, 19)]  # (M, K, N), odd sizes included


def _exact(a, za, w, zw):
    return (a.long() - za) @ (w.long() - zw.reshape(-1, 1)).t()


@pytest.mark.skipif(not int_mm_exact_on_cpu(), reason="torch._int_mm saturates on this CPU (no VNNI); ditas "
                    "does not use it here (kernels.KERNELS['int_mm'].exact_on)")
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_matmul_zp_exact(m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    za_tok = torch.randint(-200, 200, (m, 1), generator=g)
    zw = torch.randint(-50, 50, (n,), generator=g)
    for za in (torch.tensor(37), za_tok):
        for wz in (None, zw):
            got = int8_matmul_zp(a, za, w, wz)
            assert got.dtype == torch.int32
            assert torch.equal(got.long(), _exact(a, za.reshape(-1, 1), w, torch.zeros(n, dtype=torch.long)
                                                  if wz is None else wz))
    # precomputed row sums give the same result
    assert torch.equal(int8_matmul_zp(a, za_tok, w, zw, w.sum(1, dtype=torch.int64)), int8_matmul_zp(a, za_tok, w, zw))


def test_int8_matmul_zp_int64_path_and_overflow() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 64), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (6, 64), generator=g, dtype=torch.int8)
    zw = torch.full((6,), 3000)  # bound exceeds int32, exact result does not
    assert torch.equal(int8_matmul_zp(a, 0, w, zw).long(), _exact(a, 0, w, zw))
    with pytest.raises(OverflowError):
        int8_matmul_zp(torch.full((2, 64), 127, dtype=torch.int8), -100000, w, 10 ** 6)


def test_int8_matmul_zp_rejects_bad_input() -> None:
    a = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        int8_matmul_zp(a.float(), 0, torch.zeros(3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="inner dimensions"):
        int8_matmul_zp(a, 0, torch.zeros(3, 7, dtype=torch.int8))
    with pytest.raises(ValueError, match="integers"):
        int8_matmul_zp(a, torch.tensor(0.5), torch.zeros(3, 8, dtype=torch.int8))


def _layer(k: int, n: int, wbits: int, abits: int, gran: str, seed: int, bias: bool = True, offset: float = 0.0,
           lora_rank: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1 + offset)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    lora = {}
    if lora_rank:
        lora = dict(lora_down=torch.randn(lora_rank, k, generator=g) * 0.1,
                    lora_up=torch.randn(n, lora_rank, generator=g) * 0.1)
    return QuantLinear.from_linear(lin, WeightFormat(wbits), ActivationFormat(abits, gran), **lora)


def _simulated(m: QuantLinear, codes, scale, zero) -> torch.Tensor:
    w = (m.qweight.float() - m.wzero) * m.wscale
    return F.linear((codes - zero) * scale, w, m.bias)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gran", ["tensor", "token"])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("wbits,abits", [(4, 8), (8, 8), (2, 4), (3, 6), (5, 7)])
def test_int_linear_matches_simulated(kernel, gran, m, k, n, wbits, abits) -> None:
    layer = _layer(k, n, wbits, abits, gran, seed=m + 7 * k + wbits)
    g = torch.Generator().manual_seed(abits * 31 + n)
    x = torch.randn(m, k, generator=g) * 2 + 0.5
    codes, scale, zero = activation_codes(x, abits, gran)
    y = int_linear(layer, codes, scale, zero, kernel=kernel)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert _rel(y, _simulated(layer, codes, scale, zero)) < 2e-6
    assert layer.kernel_state is not None and layer.kernel_state.kernel == kernel


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gran", ["tensor", "token"])
def test_rows_whose_zero_point_does_not_fit_int8(kernel, gran) -> None:
    """Rows with all-positive (or all-negative) weights get zero points far outside the codes."""
    layer = _layer(40, 24, 8, 8, gran, seed=3, offset=0.0)
    with torch.no_grad():
        layer.wzero[:5] += torch.tensor([[300.0], [-400.0], [129.0], [-1000.0], [5000.0]])
    layer.invalidate()
    x = torch.randn(9, 40) + 3.0  # all-positive inputs: activation zero point outside [0, 255]
    codes, scale, zero = activation_codes(x, 8, gran)
    y = int_linear(layer, codes, scale, zero, kernel=kernel)
    assert layer.kernel_state.residual is not None
    assert _rel(y, _simulated(layer, codes, scale, zero)) < 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_bias_and_cache_reuse(kernel) -> None:
    layer = _layer(32, 16, 4, 8, "tensor", seed=1, bias=False)
    x = torch.randn(5, 32)
    c, s, z = activation_codes(x, 8)
    y1 = int_linear(layer, c, s, z, kernel=kernel)
    state = layer.kernel_state
    y2 = int_linear(layer, c, s, z, kernel=kernel)
    assert layer.kernel_state is state and torch.equal(y1, y2)
    assert _rel(y1, _simulated(layer, c, s, z)) < 2e-6


def test_prepared_state_holds_no_float_weight() -> None:
    layer = _layer(48, 20, 4, 8, "tensor", seed=2)
    for kernel in KERNELS:
        st = REGISTRY[kernel].prepare(layer)
        floats = [t for t in vars(st).values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        assert all(t.numel() <= 20 for t in floats)  # per-channel vectors only
        if st.w_int8 is not None:
            assert st.w_int8.dtype == torch.int8
            assert torch.equal(st.w_int8.long() + (layer.wzero.long() if st.residual is None else
                                                    layer.wzero.long() - st.residual[:, None]), layer.qweight.long())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gran", ["tensor", "token"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_quantlinear_int_vs_simulated_kernel(kernel, gran, lora_rank) -> None:
    layer = _layer(36, 20, 4, 8, gran, seed=11, lora_rank=lora_rank)
    layer.smooth = torch.rand(36) + 0.5
    x = torch.randn(2, 7, 36)
    fake = layer(x)
    codes = layer.qweight.clone()
    layer.set_kernel(kernel)
    assert "qweight" not in layer._buffers and torch.equal(layer.qweight, codes)  # one copy, codes re-derived
    integer = layer(x)
    assert integer.shape == fake.shape == (2, 7, 20)
    assert _rel(integer, fake) < 2e-6
    fused = int_forward(layer, x, kernel=kernel)
    assert fused.shape == (2, 7, 20)
    assert _rel(fused, fake) < 2e-6


@needs_int_kernel
def test_int_forward_bf16_input_returns_bf16() -> None:
    layer = _layer(16, 8, 4, 8, "tensor", seed=5)
    x = torch.randn(3, 16)
    y = int_forward(layer, x.bfloat16())
    assert y.dtype == torch.bfloat16 and _rel(y.float(), layer(x.bfloat16().float())) < 1e-2


@needs_int_kernel
def test_unsupported_layers_rejected() -> None:
    lin = nn.Linear(64, 32)
    grouped = QuantLinear.from_linear(lin, WeightFormat(4, "group", 16), ActivationFormat(8))
    c, s, z = activation_codes(torch.randn(3, 64), 8)
    with pytest.raises(ValueError, match="per-channel"):
        int_linear(grouped, c, s, z)
    layer = _layer(64, 32, 4, 8, "tensor", seed=0)
    with pytest.raises(ValueError, match=r"codes must be \(M, 64\)"):
        int_linear(layer, c[:, :10], s, z)
    with pytest.raises(ConfigError, match="unknown kernel"):
        canonical("cuda")
    with pytest.raises(ValueError, match="a_scale/a_zero"):
        int_linear(layer, c, torch.ones(3, 1), z)


@needs_int_kernel
def test_int_forward_lora_bf16_is_a_close_approximation() -> None:
    layer = _layer(64, 48, 4, 8, "tensor", seed=4, lora_rank=8)
    x = torch.randn(2, 9, 64)
    fake = layer(x)
    exact = int_forward(layer, x)
    approx = int_forward(layer, x, lora_bf16=True)
    layer.lora_rank = 0  # the same layer without its low-rank branch
    branch = fake - layer(x)
    assert branch.norm() > 0.05 * fake.norm()
    assert _rel(exact, fake) < 2e-6
    err = float((approx - exact).norm() / branch.norm())
    assert 0 < err < 1e-2  # bf16 rounding of the branch only: a few 2^-9


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_batch(kernel) -> None:
    layer = _layer(16, 8, 4, 8, "tensor", seed=6)
    y = int_linear(layer, torch.zeros(0, 16), torch.tensor(1.0), torch.tensor(0.0), kernel=kernel)
    assert y.shape == (0, 8)
