"""W4A4 algorithms: Hadamard rotation (online FWHT), SVDQuant-order absorption, GPTQ rounding, and
the per-layer search that chooses among them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ditas
from ditas.calibration.inputs import LayerInputs
from ditas.errors import ConfigError
from ditas.quantization import checkpoint as ckpt
from ditas.quantization.absorb import low_rank_split, svd_first_lora
from ditas.quantization.apply import quantize
from ditas.quantization.config import ActivationFormat, WeightFormat
from ditas.quantization.gptq import gptq_quantize, second_moment
from ditas.quantization.linear import QuantLinear
from ditas.quantization.quantizers import quantize_dequantize_weight
from ditas.quantization.recipes import recipe_config
from ditas.quantization.rotation import fwht, hadamard_block, hadamard_matrix, rotate_second_moment, rotate_weight
from ditas.quantization.search import quantize_layer
from quant_helpers import integer_kernels, random_dit


def _block_diag_hadamard(width: int, block: int) -> torch.Tensor:
    return torch.block_diag(*[hadamard_matrix(block, torch.float64)] * (width // block))


@pytest.mark.parametrize("width,block", [(8, 8), (192, 64), (768, 256), (24, 8), (64, 16)])
def test_fwht_equals_the_explicit_hadamard_matrix(width, block):
    x = torch.randn(5, 3, width, dtype=torch.float64)
    h = _block_diag_hadamard(width, block)
    assert torch.allclose(fwht(x, block), x @ h.T, atol=1e-12)
    assert torch.allclose(h @ h.T, torch.eye(width, dtype=torch.float64), atol=1e-12)  # orthogonal
    assert torch.allclose(fwht(fwht(x, block), block), x, atol=1e-12)  # its own inverse


def test_hadamard_block_is_the_largest_power_of_two_dividing_the_width():
    assert [hadamard_block(w) for w in (192, 768, 1152, 256, 7)] == [64, 256, 128, 256, 1]
    with pytest.raises(ValueError):
        fwht(torch.zeros(2, 192), 128)


def test_rotation_leaves_the_float_function_unchanged():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 192, generator=g, dtype=torch.float64), torch.randn(40, 192, generator=g, dtype=torch.float64)
    s = torch.rand(192, generator=g, dtype=torch.float64) + 0.5
    ref = x @ w.T
    assert torch.allclose(fwht(x, 64) @ rotate_weight(w, 64).T, ref, atol=1e-10)
    assert torch.allclose(fwht(x / s, 64) @ rotate_weight(w * s, 64).T, ref, atol=1e-10)  # with smoothing
    hx = second_moment([x])
    xr = fwht(x, 64)
    assert torch.allclose(rotate_second_moment(hx, 64), xr.T @ xr, atol=1e-9)


def test_quantlinear_with_rotation_is_the_rotated_float_layer():
    """An unquantized path (8-bit weights held exactly as the rotated weight's codes, float
    activations): the layer computes ``fwht(x / s) Wq^T + b``, equal to the float layer up to the
    weight rounding, and far closer than the weight error would allow without rotating consistently."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(192, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 192, generator=g))
    s = torch.rand(192, generator=g) + 0.5
    q = QuantLinear.from_linear(lin, WeightFormat(8), ActivationFormat(16), smooth=s,
                                weight=lin.weight * s, rotation=64)
    x = torch.randn(6, 192, generator=g)
    with torch.no_grad():
        y, ref = q(x), lin(x)
    manual = F.linear(fwht(x / s, 64), q.dequantized_weight(), lin.bias)
    assert torch.allclose(y, manual, atol=1e-5)
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    assert "rotation=hadamard64" in repr(q)
    with pytest.raises(ConfigError, match="rotation"):
        QuantLinear(192, 8, WeightFormat(4), ActivationFormat(8), rotation=128)


def test_low_rank_split_is_exact_before_quantization():
    w = torch.randn(64, 96, dtype=torch.float64).float()
    up, down, resid = low_rank_split(w, 8)
    assert torch.allclose(up @ down + resid, w, atol=1e-5)
    assert torch.linalg.matrix_rank(up @ down) == 8
    fit = svd_first_lora(w, lambda v: quantize_dequantize_weight(v, 4), 8)
    assert torch.equal(fit.up, up) and torch.equal(fit.down, down)  # the branch is the SVD part, not refitted
    assert torch.allclose(fit.dequant, quantize_dequantize_weight(resid, 4)[1])


def _correlated_inputs(seed: int, n: int = 1024, width: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g)
    return torch.randn(n, width, generator=g) @ mix + 0.3 * torch.randn(n, width, generator=g)


@pytest.mark.parametrize("layout,group", [("channel", 0), ("group", 16), ("reference32", 0)])
@pytest.mark.parametrize("order", ["natural", "desc"])
def test_gptq_output_error_is_below_round_to_nearest(layout, group, order):
    x = _correlated_inputs(0)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    (codes, scale, zero), deq = gptq_quantize(w, second_moment([x]), 4, layout, group, order=order)
    (rcodes, rscale, rzero), rtn = quantize_dequantize_weight(w, 4, layout, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scale.shape == rscale.shape and torch.equal(scale, rscale) and torch.equal(zero, rzero)
    from ditas.quantization.quantizers import dequantize_weight
    assert torch.equal(dequantize_weight(codes, scale, zero, layout, group), deq)  # codes and deq agree
    err = ((x @ (deq - w).T) ** 2).mean()
    err_rtn = ((x @ (rtn - w).T) ** 2).mean()
    assert err < 0.8 * err_rtn


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("order", ["natural", "desc"])
def test_gptq_on_fp4_keeps_the_block_scales_and_is_below_round_to_nearest(fmt, order):
    from ditas.quantization.fp4 import dequantize_fp4, quantize_dequantize_fp4

    x = _correlated_inputs(0)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    (codes, scales, tscale), deq = gptq_quantize(w, second_moment([x]), 4, order=order, fmt=fmt)
    (rcodes, rscales, rtscale), rtn = quantize_dequantize_fp4(w, fmt)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
    assert torch.equal(scales, rscales)  # round-to-nearest's block scales, kept
    assert (tscale is None) == (fmt == "mxfp4") and (tscale is None or torch.equal(tscale, rtscale))
    assert torch.equal(dequantize_fp4(codes, scales, tscale), deq)  # codes and deq agree
    assert not torch.equal(codes, rcodes)  # GPTQ chose other codes than round-to-nearest
    err = ((x @ (deq - w).T) ** 2).mean()
    err_rtn = ((x @ (rtn - w).T) ** 2).mean()
    assert err < 0.8 * err_rtn


def _layer_inputs(seed: int, width: int = 64) -> LayerInputs:
    xs = [_correlated_inputs(seed + t, 128, width) for t in range(3)]
    xs[0][:, :2] *= 10  # outlier channels
    return LayerInputs(xs, torch.stack([x.amin(0) for x in xs]), torch.stack([x.amax(0) for x in xs]),
                       torch.stack([x.abs().amax(0) for x in xs]).amax(0))


def test_the_search_chooses_among_variants_and_records_the_choice():
    inp = _layer_inputs(3)
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    base = dict(a_bits=4, act_granularity="token", lora_rank=4, lora_rounds=2, alpha_grid=(0.3, 0.6))
    one = {v: quantize_layer("l", "qkv", w, b, inp, recipe_config("ditas", **base, **kw)).loss
           for v, kw in (("plain", {}), ("rot", dict(rotation="hadamard")), ("svd", dict(lora_order="svd_first")),
                         ("gptq", dict(w_rounding="gptq")))}
    r = quantize_layer("l", "qkv", w, b, inp, recipe_config("ditas", rotation="search", lora_order="search",
                                                              w_rounding="search", **base))
    assert len(r.variant_losses) == 8 and r.loss == pytest.approx(min(r.variant_losses.values()), rel=1e-6)
    assert r.loss <= min(one.values()) * (1 + 1e-6)
    s = r.summary()
    assert s["rotation"] in (0, 64) and s["lora_order"] in ("quantize_first", "svd_first")
    assert s["rounding"] in ("nearest", "gptq") and len(s["variant_losses"]) == 8
    assert one["plain"] == pytest.approx(r.variant_losses["rot0/quantize_first/nearest"], rel=1e-6)


def test_config_names_and_refusals():
    cfg = recipe_config("ditas", rotation="search", lora_order="svd_first", w_rounding="gptq", gptq_order="desc")
    assert (cfg.smooth.rotation, cfg.lora.order, cfg.weights.rounding, cfg.weights.gptq_order) == \
        ("search", "svd_first", "gptq", "desc")
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (dict(rotation="givens"), dict(lora_order="x"), dict(w_rounding="up"), dict(gptq_order="random")):
        with pytest.raises(ConfigError):
            recipe_config("ditas", **bad)
    with pytest.raises(ConfigError, match="quantize-before-smooth"):
        recipe_config("paper", rotation="hadamard")


@pytest.fixture(scope="module")
def rotated():
    m = random_dit(5, depth=2, hidden=64, heads=4)
    cfg = recipe_config("ditas", a_bits=4, act_granularity="token", steps=2, calib_labels=2, lora_rank=4,
                        lora_rounds=2, alpha_grid=(0.25, 0.75), rotation="hadamard", w_rounding="gptq",
                        lora_order="search")
    q, report = quantize(m, cfg, progress=False, kernel="simulated")
    return m, q, cfg, report


def test_a_rotated_model_saves_and_loads_bit_exact(tmp_path, rotated):
    _, q, cfg, report = rotated
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.rotation == hadamard_block(m.in_features) for m in layers)  # 64, and 256 for fc2
    assert all(entry["rotation"] in (64, 256) and entry["rounding"] == "gptq" for entry in report["layers"].values())
    out = ckpt.save_quantized(q, tmp_path / "q", cfg, report)
    meta = json.loads((out / "config.json").read_text())["quantization"]
    assert meta["format_version"] == ckpt.FORMAT_VERSION == 5  # a version-4 reader refuses it
    table = meta["layers"]
    assert all(e["rotation"] == hadamard_block(e["in_features"]) for e in table.values())
    loaded = ditas.load_dit(out, kernel="simulated")
    a, b = q.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m.rotation for m in loaded.modules() if isinstance(m, QuantLinear)] == [m.rotation for m in layers]
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(q(x, t, y), loaded(x, t, y))


def test_an_entry_without_rotation_reads_as_unrotated():
    from ditas.quantization.layer_schema import layer_args, layer_meta
    meta = layer_meta(QuantLinear.from_linear(nn.Linear(16, 8), WeightFormat(4), ActivationFormat(8)))
    assert meta["rotation"] == 0
    del meta["rotation"]  # an entry written before rotations existed
    assert layer_args(meta)[1]["rotation"] == 0


def test_the_quantized_rotated_model_stays_close_to_float(rotated):
    m, q, _, _ = rotated
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        ref, out = m(x, t, y), q(x, t, y)
    assert float((out - ref).norm() / ref.norm()) < 0.5


@pytest.mark.parametrize("kernel", integer_kernels())
@pytest.mark.parametrize("gran", ["tensor", "token"])
def test_integer_kernel_matches_simulated_with_rotation(kernel, gran):
    g = torch.Generator().manual_seed(6)
    lin = nn.Linear(48, 20)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 48, generator=g) * 0.1)
    layer = QuantLinear.from_linear(lin, WeightFormat(4), ActivationFormat(4, gran), smooth=torch.rand(48) + 0.5,
                                    lora_down=torch.randn(3, 48, generator=g) * 0.1,
                                    lora_up=torch.randn(20, 3, generator=g) * 0.1, rotation=16)
    x = torch.randn(2, 5, 48, generator=g)
    fake = layer(x)
    layer.set_kernel(kernel)
    integer = layer(x)
    assert float((integer - fake).norm() / fake.norm()) < 2e-6


def test_fwht_under_autograd_is_the_same_transform_and_differentiates():
    """A rotated layer called outside ``torch.no_grad`` (its input tracks gradients through the
    model's parameters): the butterfly stages cannot write into buffers there, and take new
    tensors instead; same values, and the gradient of the orthogonal H is H applied back."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g)
    with torch.no_grad():
        want = fwht(x, 256)
    xg = x.clone().requires_grad_()
    got = fwht(xg, 256)
    assert got.requires_grad and torch.allclose(got, want, atol=1e-6)
    w = torch.randn(5, 256, generator=g)
    (got * w).sum().backward()
    assert torch.allclose(xg.grad, fwht(w, 256), atol=1e-5)  # H symmetric: H^T w = H w
