"""TAS factors, the alpha search and the training-free LoRA on fresh random data."""

from __future__ import annotations

import pytest
import torch

from ditas.quantization.lora import training_free_lora
from ditas.quantization.quantizers import fake_quant_activation
from ditas.quantization.recipes import recipe_config
from ditas.quantization.search import LayerInputs, _quant_inputs, quantize_layer, weight_quantizer
from ditas.quantization.smoothing import tas_factors


def _inputs(steps=4, tokens=48, width=32, seed=0, outliers=(1, 7)):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for t in range(steps):
        x = torch.randn(tokens, width, generator=g) * (1 + 0.3 * t)
        x[:, list(outliers)] *= 20
        xs.append(x)
    return LayerInputs(xs, torch.stack([x.amin(0) for x in xs]), torch.stack([x.amax(0) for x in xs]),
                       torch.stack([x.abs().amax(0) for x in xs]).amax(0))


def test_tas_factors_formula():
    a = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = tas_factors(a, w, 0.5)
    torch.testing.assert_close(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] == pytest.approx(1e-4)  # floor
    torch.testing.assert_close(tas_factors(a, w, 1.0)[:2], a[:2])


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_search_activation_quantizer_equals_quantizing_x_over_s(granularity):
    inputs = _inputs(seed=3)
    s = torch.rand(32) * 3 + 0.1
    cfg = recipe_config("ditas", act_granularity=granularity, a_bits=6)
    got = _quant_inputs(inputs, len(inputs.xs), s, cfg)
    want = torch.cat([fake_quant_activation(x / s, 6, granularity) for x in inputs.xs])
    assert torch.equal(got, want)


def test_grid_search_returns_argmin_of_its_loss():
    torch.manual_seed(1)
    w, b = torch.randn(24, 32) * 0.2, torch.randn(24) * 0.1
    inputs = _inputs(seed=1)
    cfg = recipe_config("tas_search", search_tokens=None)
    r = quantize_layer("l", "fc1", w, b, inputs, cfg)
    assert len(r.losses) == 21
    assert r.alpha == min(r.losses, key=r.losses.get)
    assert r.losses[r.alpha] == pytest.approx(r.loss)
    # the loss is the definition: sum over steps of the per-step MSE
    s = tas_factors(inputs.absmax, w.abs().amax(0), r.alpha)
    wq = weight_quantizer(cfg)(w * s)[1]
    want = sum(float(((fake_quant_activation(x / s, 8) @ wq.T + b - (x @ w.T + b)) ** 2).mean()) for x in inputs.xs)
    assert r.loss == pytest.approx(want, rel=1e-5)
    # smoothing helps against outlier channels: better than no smoothing at all
    rtn = quantize_layer("l", "fc1", w, b, inputs, recipe_config("rtn"))
    assert r.loss < rtn.loss


def test_loss_steps_limits_the_loss_to_the_first_steps():
    torch.manual_seed(2)
    w = torch.randn(16, 32) * 0.2
    inputs = _inputs(steps=5, seed=2)
    full = quantize_layer("l", "fc1", w, None, inputs, recipe_config("tas", search_tokens=None))
    first = quantize_layer("l", "fc1", w, None, inputs, recipe_config("tas", search_tokens=None, loss_steps=2))
    assert first.loss < full.loss


@pytest.mark.parametrize("search_weight", ["auto", "plain", "approx", "shortlist", "exact"])
def test_lora_kept_round_is_the_minimum(search_weight):
    torch.manual_seed(3)
    w = torch.randn(48, 32) * 0.2
    inputs = _inputs(seed=4)
    cfg = recipe_config("ditas", lora_rank=4, lora_rounds=6, search_weight=search_weight,
                        alpha_grid=(0.0, 0.5, 1.0))
    r = quantize_layer("l", "qkv", w, None, inputs, cfg)
    assert r.lora_err_per_round[r.lora_kept_round] == min(r.lora_err_per_round)
    assert r.alpha == min(r.losses, key=r.losses.get)
    assert r.lora_up.shape == (48, 4) and r.lora_down.shape == (4, 32)


def test_lora_reduces_weight_error():
    torch.manual_seed(4)
    w = torch.randn(64, 64)
    q = weight_quantizer(recipe_config("ditas", w_bits=3))
    plain = training_free_lora(w, q, 0, 1)
    fit = training_free_lora(w, q, 8, 5, keep="best", svd="exact")
    assert fit.error < plain.error
    fast = training_free_lora(w, q, 8, 5, keep="best", svd="randomized")
    assert fast.error < plain.error and fast.error < 1.05 * fit.error


def test_shortlist_search_rescores_the_best_one_round_alphas_with_all_rounds():
    """``shortlist`` = the argmin of the exact (all-rounds) loss over the k best alphas of the
    one-round (``approx``) search; with k = the whole grid it is the exact search."""
    torch.manual_seed(5)
    w = torch.randn(40, 32) * 0.2
    inputs = _inputs(seed=6)
    common = dict(lora_rank=4, lora_rounds=5, alpha_grid=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), search_tokens=None)
    exact = quantize_layer("l", "fc1", w, None, inputs, recipe_config("ditas", search_weight="exact", **common))
    approx = quantize_layer("l", "fc1", w, None, inputs, recipe_config("ditas", search_weight="approx", **common))
    for k in (1, 2, 3):
        short = quantize_layer("l", "fc1", w, None, inputs,
                               recipe_config("ditas", search_weight="shortlist", search_shortlist=k, **common))
        listed = sorted(approx.losses, key=approx.losses.get)[:k]
        want = min(sorted(listed), key=exact.losses.get)
        assert short.alpha == want
        assert short.loss == pytest.approx(exact.losses[want], rel=1e-6)
        for a in listed:
            assert short.losses[a] == pytest.approx(exact.losses[a], rel=1e-6)
    full = quantize_layer("l", "fc1", w, None, inputs,
                          recipe_config("ditas", search_weight="shortlist", search_shortlist=6, **common))
    assert full.alpha == exact.alpha and full.loss == pytest.approx(exact.loss, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(full.codes, exact.codes))


@pytest.mark.parametrize("search_weight", ["exact", "shortlist", "approx"])
def test_parallel_alpha_search_equals_the_serial_one(search_weight):
    """Alphas are scored on several threads; every result must be bit-identical to one thread
    (each fit is seeded by its own round numbers, no global RNG) and torch's thread count restored."""
    torch.manual_seed(6)
    w = torch.randn(1100, 40) * 0.2  # > 1024 rows: the randomized SVD path
    inputs = _inputs(width=40, seed=7)
    common = dict(lora_rank=4, lora_rounds=4, alpha_grid=(0.0, 0.25, 0.5, 0.75, 1.0), search_weight=search_weight,
                  lora_svd="randomized")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker then runs single-threaded ops too: the same float sums
    try:
        one = quantize_layer("l", "fc1", w, None, inputs, recipe_config("ditas", search_workers=1, **common))
        three = quantize_layer("l", "fc1", w, None, inputs, recipe_config("ditas", search_workers=3, **common))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert one.alpha == three.alpha and one.losses == three.losses and one.loss == three.loss
    assert all(torch.equal(a, b) for a, b in zip(one.codes, three.codes))
    assert torch.equal(one.lora_up, three.lora_up) and torch.equal(one.lora_down, three.lora_down)


def test_auto_search_is_the_exact_search():
    torch.manual_seed(7)
    w = torch.randn(40, 32) * 0.2
    inputs = _inputs(seed=8)
    common = dict(lora_rank=4, lora_rounds=3, alpha_grid=(0.0, 0.3, 0.6, 0.9))
    auto = quantize_layer("l", "qkv", w, None, inputs, recipe_config("ditas", search_weight="auto", **common))
    exact = quantize_layer("l", "qkv", w, None, inputs, recipe_config("ditas", search_weight="exact", **common))
    assert auto.losses == exact.losses and auto.alpha == exact.alpha
    assert all(torch.equal(a, b) for a, b in zip(auto.codes, exact.codes))


def test_bias_correction_removes_the_mean_output_error_and_lowers_the_loss():
    """With ``bias_correction`` the layer's bias absorbs its mean output error over the calibration
    steps: the loss falls by exactly steps x the mean's energy per channel, and the corrected layer
    has no mean error left."""
    torch.manual_seed(8)
    w, b = torch.randn(24, 32) * 0.2, torch.randn(24) * 0.1
    inputs = _inputs(seed=9)
    common = dict(search_tokens=None, lora_rank=4, lora_rounds=3, alpha_grid=(0.0, 0.5, 1.0))
    plain = quantize_layer("l", "fc1", w, b, inputs, recipe_config("ditas", **common))
    fixed = quantize_layer("l", "fc1", w, b, inputs, recipe_config("ditas", bias_correction=True, **common))
    assert fixed.alpha == plain.alpha and all(torch.equal(x, y) for x, y in zip(fixed.codes, plain.codes))
    s = fixed.smooth  # rebuild the layer's function from its parts
    wq = (fixed.codes[0].float() - fixed.codes[2]) * fixed.codes[1] + fixed.lora_up @ fixed.lora_down

    def errors(bias):
        return [fake_quant_activation(x / s, 8) @ wq.T + bias - (x @ w.T + b) for x in inputs.xs]

    mean = torch.stack([e.mean(0) for e in errors(b)]).mean(0)
    assert torch.allclose(fixed.bias, b - mean, atol=1e-6)
    assert torch.stack([e.mean(0) for e in errors(fixed.bias)]).mean(0).abs().max() < 1e-5
    want = plain.loss - len(inputs.xs) * float(mean.pow(2).mean())
    assert fixed.loss == pytest.approx(want, rel=1e-4) and fixed.loss < plain.loss
