"""The rank-r fits of the training-free LoRA: LAPACK and the warm-startable randomized SVD."""

from __future__ import annotations

import pytest
import torch

from ditas.quantization.lora import low_rank, training_free_lora
from ditas.quantization.quantizers import dequantize_weight, quantize_dequantize_weight, quantize_weight
from ditas.quantization.recipes import recipe_config
from ditas.quantization.search import weight_quantizer


def _noisy_low_rank(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return (u * torch.linspace(10, 2, r)) @ v.T + 0.05 * torch.randn(m, n, generator=g)  # slowly decaying spectrum


def _fit_error(e, rank, **kw):
    up, down, basis = low_rank(e, rank, **kw)
    return float(torch.linalg.norm(e - up @ down)), basis


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_randomized_fit_is_near_optimal_cold_and_warm(shape):
    e = _noisy_low_rank(*shape, r=24, seed=0)
    best, none = _fit_error(e, 8, method="exact")
    assert none is None
    cold, basis = _fit_error(e, 8, method="randomized", seed=3)
    assert best * (1 - 1e-5) <= cold <= 1.01 * best
    assert basis.shape == (shape[1], min(8 + 16, *shape))
    # a nearby matrix (the next LoRA round's residual) from the previous basis: one iteration
    e2 = e + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(9))
    best2, _ = _fit_error(e2, 8, method="exact")
    warm, _ = _fit_error(e2, 8, method="randomized", seed=4, start=basis)
    assert best2 * (1 - 1e-5) <= warm <= 1.01 * best2


def test_randomized_fit_uses_no_global_rng():
    e = _noisy_low_rank(200, 80, r=6, seed=1)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = low_rank(e, 4, method="randomized", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)
    b = low_rank(e, 4, method="randomized", seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_warm_started_lora_rounds_match_lapack_quality():
    """The LoRA rounds with the randomized SVD (each round warm-started from the last) end within
    1 % of the LAPACK rounds' error on a fresh random weight with outlier columns."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 192, generator=g) * (1 + 4 * torch.rand(1, 192, generator=g))
    q = weight_quantizer(recipe_config("ditas"))
    lapack = training_free_lora(w, q, 16, 6, svd="exact")
    rand = training_free_lora(w, q, 16, 6, svd="randomized")
    assert rand.error <= 1.01 * lapack.error
    assert rand.err_per_round[-1] < rand.err_per_round[0]


@pytest.mark.parametrize("layout,group", [("channel", 0), ("group", 16), ("reference32", 0)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_dequantize_weight_equals_the_two_steps(layout, group, bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 48, generator=g) * torch.rand(1, 48, generator=g) * 3
    codes = quantize_weight(w, bits, layout, group)
    (q, scale, zero), deq = quantize_dequantize_weight(w, bits, layout, group)
    assert torch.equal(q, codes[0]) and torch.equal(scale, codes[1]) and torch.equal(zero, codes[2])
    assert torch.equal(deq, dequantize_weight(*codes, layout, group))
