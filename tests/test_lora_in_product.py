"""The LoRA down-projection inside the integer product (``kernels.integer.lora_limbs``).

The down rows of the low-rank branch are appended to the prepared int8 weight as ``limbs`` int8
rows each, so one integer product gives the layer's outputs and the rank-r intermediate. Checked
here: the limb decomposition's error bound, exactness on small integer cases (integer codes,
integer weights, integer LoRA factors: the whole layer is exact in float32), agreement with the
simulated path, and the options (fewer limbs, bf16 up-projection) as bounded
approximations.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from ditas.errors import ConfigError
from ditas.quantization.kernels import use_kernels
from ditas.quantization.kernels.integer import LIMB_BASE, MAX_LORA_LIMBS, lora_limbs
from ditas.quantization.kernels.onednn import onednn_works
from ditas.quantization.config import ActivationFormat, WeightFormat
from ditas.quantization.linear import QuantLinear
from quant_helpers import int_forward, int_linear, integer_kernels, needs_int_kernel

KERNELS = integer_kernels()
pytestmark = pytest.mark.exactness


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _layer(k: int, n: int, rank: int, seed: int, gran: str = "tensor", bias: bool = True) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
    return QuantLinear.from_linear(lin, WeightFormat(4), ActivationFormat(8, gran),
                                   lora_down=torch.randn(rank, k, generator=g) * 0.1,
                                   lora_up=torch.randn(n, rank, generator=g) * 0.1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), limbs=st.integers(1, MAX_LORA_LIMBS), scale=st.sampled_from([1e-4, 0.1, 30.0]))
def test_limbs_reconstruct_the_rows_within_their_bound(seed, limbs, scale):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(5, 37, generator=g, dtype=torch.float64) * scale
    down[2] = 0.0  # an all-zero row is fine
    rows, scales = lora_limbs(down, limbs)
    assert rows.dtype == torch.int8 and rows.shape == (5 * limbs, 37) and scales.shape == (5 * limbs,)
    if limbs > 1:
        assert int(rows[5:].abs().max()) <= LIMB_BASE // 2  # later limbs are remainders
    recon = (rows.double() * scales.double()[:, None]).reshape(limbs, 5, 37).sum(0)
    row_max = down.abs().amax(1, keepdim=True)
    bound = 0.5 / 127 / LIMB_BASE ** (limbs - 1) * row_max * (1 + 1e-6) + 1e-6 * row_max / LIMB_BASE ** limbs
    assert bool(((recon - down).abs() <= bound).all())
    if limbs > 1:  # one more limb is strictly more precise on random rows
        prev_rows, prev_scales = lora_limbs(down, limbs - 1)
        prev = (prev_rows.double() * prev_scales.double()[:, None]).reshape(limbs - 1, 5, 37).sum(0)
        assert (recon - down).norm() < (prev - down).norm()


@needs_int_kernel
def test_limbs_reject_bad_counts():
    with pytest.raises(ValueError, match="limbs"):
        lora_limbs(torch.ones(2, 3), 0)
    layer = _layer(8, 4, 2, seed=0)
    layer.lora_limbs = MAX_LORA_LIMBS + 1
    with pytest.raises(ValueError, match="lora limbs"):
        layer.set_kernel(KERNELS[0])


def _integer_layer(kernel: str, limbs: int, gran: str, seed: int):
    """A layer whose every quantity is an integer: codes, weights, LoRA factors, scales 1."""
    g = torch.Generator().manual_seed(seed)
    k, n, r, m = 24, 10, 3, 7
    layer = QuantLinear(k, n, WeightFormat(4), ActivationFormat(8, gran), lora_rank=r)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 16, (n, 1), generator=g).float()
    down = torch.randint(-127, 128, (r, k), generator=g).float()
    down[:, 0] = 127.0  # every row's largest entry is 127: its limb scale is exactly 1
    up = torch.randint(-3, 4, (n, r), generator=g).float()
    bias = torch.randint(-50, 50, (n,), generator=g).float()
    with torch.no_grad():
        layer.qweight.copy_(q)
        layer.wzero.copy_(z)
        layer.wscale.fill_(1.0)
        layer.bias.copy_(bias)
        layer.lora_down.copy_(down)
        layer.lora_up.copy_(up)
    layer.lora_limbs = limbs
    layer.set_kernel(kernel)
    # inputs with range exactly 255 per tensor / per token: activation scale 1, codes x + zero point
    x = torch.randint(-100, 156, (m, k), generator=g).float()
    x[:, 0], x[:, 1] = -100.0, 155.0
    xa = x  # (codes - z_a) * s_a with s_a = 1, z_a = 100, codes = x + 100
    exact = (xa.long() @ (q.long() - z.long()).t() + ((xa.long() @ down.long().t()) @ up.long().t())
             + bias.long())
    return layer, x, exact


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("limbs", range(0, MAX_LORA_LIMBS + 1))
@pytest.mark.parametrize("gran", ["tensor", "token"])
def test_exact_on_small_integer_cases(kernel, limbs, gran):
    layer, x, exact = _integer_layer(kernel, limbs, gran, seed=limbs + 5)
    assert layer.kernel_state.lora_limbs == limbs and layer.kernel_state.product_features == 10 + 3 * limbs
    assert int(exact.abs().max()) < 2 ** 24  # every partial result is exact in float32
    y = layer(x)
    assert y.shape == (7, 10) and torch.equal(y.double(), exact.double())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gran", ["tensor", "token"])
def test_default_limbs_agree_with_the_simulated_path(kernel, gran):
    layer = _layer(72, 40, 6, seed=3, gran=gran)
    layer.smooth = torch.rand(72) + 0.5
    x = torch.randn(3, 11, 72)
    sim = layer(x)
    layer.set_kernel(kernel)
    st = layer.kernel_state
    assert st.lora_limbs == MAX_LORA_LIMBS and st.lora_down_sum is None  # down rows live in the product
    y = layer(x)
    assert y.shape == sim.shape and _rel(y, sim) < 2e-6
    # int_linear still returns the main product only (no LoRA columns)
    assert int_linear(layer, *layer.quantize_input(x.reshape(-1, 72)), kernel=kernel).shape == (33, 40)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fewer_limbs_and_float_options_are_bounded_approximations(kernel):
    layer = _layer(96, 48, 8, seed=4)
    x = torch.randn(2, 9, 96)
    sim = layer(x)
    layer.lora_rank = 0
    branch = sim - layer(x)  # the low-rank branch alone
    layer.lora_rank = 8
    assert branch.norm() > 0.05 * sim.norm()
    layer.set_kernel(kernel)
    errs = {}
    for limbs in range(MAX_LORA_LIMBS, 0, -1):
        layer.lora_limbs = limbs
        errs[limbs] = float((layer(x) - sim).norm() / branch.norm())
    assert errs[3] < 2e-5 < errs[2] < 1e-3 < errs[1] < 1e-2  # ~7 bits per limb
    layer.lora_limbs, layer.lora_bf16 = 3, True
    bf16_err = float((layer(x) - sim).norm() / branch.norm())
    assert 1e-5 < bf16_err < 1e-2


@needs_int_kernel
def test_use_kernels_sets_and_checks_the_limbs():
    model = nn.Sequential(_layer(16, 8, 2, seed=1), _layer(16, 8, 2, seed=2))
    with pytest.raises(ConfigError, match="lora_limbs"):
        use_kernels(model, lora_limbs=MAX_LORA_LIMBS + 1)
    assert [m.kernel for m in model] == ["simulated", "simulated"]
    use_kernels(model, lora_limbs=1)
    assert all(m.kernel_state.lora_limbs == 1 for m in model)
    assert "lora_down=int8x1" in repr(model[0])


@pytest.mark.skipif(not onednn_works(), reason="oneDNN kernel not in this torch build")
def test_changing_the_limbs_reprepares_and_keeps_the_codes():
    layer = _layer(32, 16, 4, seed=6)
    codes = layer.qweight.clone()
    layer.set_kernel("onednn")
    x = torch.randn(5, 32)
    y3 = layer(x)
    layer.lora_limbs = 0
    y0 = int_forward(layer, x)
    assert layer.kernel_state.lora_limbs == 0 and _rel(y0, y3) < 2e-6
    assert torch.equal(layer.qweight, codes) and "qweight" not in layer._buffers
