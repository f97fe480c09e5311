"""Activation and weight number formats: FP4 (NVFP4, MXFP4) against hand-computed codes and scales,
group-wise and per-token INT4 activations, the kernel registry's choices, and checkpoints."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn as nn

import ditas
from ditas.errors import CheckpointError, ConfigError
from ditas.quantization import checkpoint as ckpt
from ditas.quantization.apply import quantize
from ditas.quantization.config import ActivationFormat, QuantConfig, WeightFormat
from ditas.quantization.fp4 import (decode_block_scales, dequantize_fp4, e2m1_codes, e2m1_values,
                                    encode_block_scales, quantize_fp4)
from ditas.quantization.kernels import KERNELS, choose, use_kernels
from ditas.quantization.linear import QuantLinear
from ditas.quantization.quantizers import activation_quantizer, fake_quant_activation, weight_quantizer
from ditas.quantization.recipes import recipe_config
from quant_helpers import int_forward, integer_kernels, needs_int_kernel, random_dit

pytestmark = pytest.mark.exactness


def _row(*blocks: list[float], block: int) -> torch.Tensor:
    """One row of the given blocks, each padded with zeros to ``block`` elements."""
    return torch.tensor([sum((b + [0.0] * (block - len(b)) for b in blocks), [])])


def _codes_row(*blocks: list[int], block: int) -> torch.Tensor:
    return torch.tensor([sum((b + [0] * (block - len(b)) for b in blocks), [])], dtype=torch.uint8)


# -- E2M1 -------------------------------------------------------------------------------------------


def test_e2m1_rounds_to_nearest_ties_to_even_and_saturates() -> None:
    # magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 are codes 0..7; bit 3 is the sign
    v = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 7.0, 100.0,
                      -0.25, -0.3, -1.5, -6.0, -100.0, -0.0, 2.9])
    want = [0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 7, 7,
            0, 9, 11, 15, 15, 0, 5]  # ties: .25->0, .75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert e2m1_codes(v).tolist() == want
    assert e2m1_values(torch.arange(16, dtype=torch.uint8)).tolist() == [
        0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]


# -- NVFP4 ------------------------------------------------------------------------------------------


def test_nvfp4_hand_computed_codes_and_scales() -> None:
    u = 1.125
    x = _row([2688.0, -2688.0, 224.0, 1344.0, -672.0, 89.6, 134.4],          # amax 2688: g = 1, scale 448
             [u * v for v in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.75, -0.25)] + [6.6],  # 1.1 -> 1.125
             [6.375, 1.0],                                                   # 1.0625: a tie, to 1.0; 6.375 saturates
             [],                                                             # all zeros: scale 1.0, codes 0
             block=16)
    codes, scales, g = quantize_fp4(x, "nvfp4")
    assert g.tolist() == [1.0]
    assert scales.tolist() == [[448.0, 1.125, 1.0, 1.0]]
    assert encode_block_scales(scales, "nvfp4").tolist() == [[0x7E, 0x39, 0x38, 0x38]]  # E4M3 bits
    assert torch.equal(codes, _codes_row([7, 15, 1, 5, 11, 0, 1],
                                         [0, 2, 2, 4, 4, 6, 6, 14, 10, 0, 7],
                                         [7, 2], [], block=16))
    deq = dequantize_fp4(codes, scales, g)
    assert deq[0, :5].tolist() == [2688.0, -2688.0, 224.0, 1344.0, -672.0]
    assert deq[0, 32:34].tolist() == [6.0, 1.0] and not deq[0, 48:].any()
    # twice the tensor: the same codes and block scales, twice the tensor scale
    codes2, scales2, g2 = quantize_fp4(2 * x, "nvfp4")
    assert torch.equal(codes2, codes) and torch.equal(scales2, scales) and g2.tolist() == [2.0]
    # an all-zero tensor: tensor scale 1, block scales 1, codes 0 (no division by zero)
    c0, s0, g0 = quantize_fp4(torch.zeros(2, 16), "nvfp4")
    assert g0.tolist() == [1.0] and s0.tolist() == [[1.0], [1.0]] and not c0.any()


def test_nvfp4_tensor_scale_fits_the_block_scales_into_e4m3() -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 1e4
    codes, scales, g = quantize_fp4(x, "nvfp4")
    assert float(scales.max()) == 448.0 and bool((scales > 0).all())
    assert torch.equal(decode_block_scales(encode_block_scales(scales, "nvfp4"), "nvfp4"), scales)
    err = (dequantize_fp4(codes, scales, g) - x).abs().reshape(8, 4, 16)
    # within half the largest E2M1 step (2 at magnitude 6) of each block's scale
    assert bool((err <= (scales * g)[..., None] + 1e-3).all())


# -- MXFP4 ------------------------------------------------------------------------------------------


def test_mxfp4_hand_computed_codes_and_exponents() -> None:
    x = _row([5.0, 0.25, -0.75, 1.75, -2.5],  # floor(log2 5) = 2 -> e = 0
             [7.9, -7.0, 4.0],                # e = 0; 7.9 and -7 saturate at +-6
             [0.1, 0.05],                     # floor(log2 0.1) = -4 -> e = -6: 6.4 -> 6, 3.2 -> 3
             [],                              # all zeros: e = -127 (E8M0 byte 0)
             [8.0, -1.0, 3.0],                # amax a power of two: floor(log2 8) = 3 -> e = 1
             block=32)
    codes, scales, g = quantize_fp4(x, "mxfp4")
    assert g is None
    assert encode_block_scales(scales, "mxfp4").tolist() == [[127, 127, 121, 0, 128]]  # e + 127
    assert scales.tolist() == [[1.0, 1.0, 2.0 ** -6, 2.0 ** -127, 2.0]]
    assert torch.equal(codes, _codes_row([6, 0, 10, 4, 12], [7, 15, 6], [7, 5], [], [6, 9, 3], block=32))
    assert torch.equal(decode_block_scales(encode_block_scales(scales, "mxfp4"), "mxfp4"), scales)
    deq = dequantize_fp4(codes, scales, g)
    assert deq[0, 64:66].tolist() == [6 * 2.0 ** -6, 3 * 2.0 ** -6]
    assert deq[0, 128:131].tolist() == [8.0, -1.0, 3.0]


def test_fp4_needs_whole_blocks() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_fp4(torch.ones(2, 48), "mxfp4")


# -- INT activations: per group, per token --------------------------------------------------------


def test_group_activations_are_per_token_over_groups() -> None:
    x = torch.tensor([[0.0, 1.0, 10.0, 20.0], [-3.0, 3.0, 0.5, 0.25]])
    got = fake_quant_activation(x, 4, "group", group_size=2)
    want = fake_quant_activation(x.reshape(4, 2), 4, "token").reshape(2, 4)
    assert torch.equal(got, want)
    assert got[0].tolist() == pytest.approx([0.0, 1.0, 10.0, 20.0], abs=1e-6)  # each group's own range
    assert not torch.equal(got, fake_quant_activation(x, 4, "token"))  # the row's one range loses 1.0
    with pytest.raises(ValueError, match="does not divide"):
        fake_quant_activation(x, 4, "group", group_size=3)


def test_format_defaults_and_validation() -> None:
    assert ActivationFormat(bits=4).granularity == "token"  # below 8 bits: per token by default
    assert ActivationFormat(bits=8).granularity == "tensor"
    assert ActivationFormat(bits=4, granularity="tensor").granularity == "tensor"  # explicit: kept
    assert recipe_config("ditas", a_bits=4).activations.granularity == "token"
    assert recipe_config("ditas", a_bits=4, act_granularity="tensor").activations.granularity == "tensor"
    g = recipe_config("rtn", a_bits=4, act_granularity="group").activations
    assert (g.granularity, g.group_size) == ("group", 64)
    nv = recipe_config("ditas_nvfp4")
    assert (nv.weights.format, nv.weights.layout, nv.weights.group_size, nv.weights.bits) == ("nvfp4", "group", 16, 4)
    assert (nv.activations.format, nv.activations.granularity, nv.activations.group_size) == ("nvfp4", "group", 16)
    assert QuantConfig.from_dict(nv.to_dict()) == nv
    mx = recipe_config("rtn", w_bits=4, a_bits=4, w_format="mxfp4", a_format="mxfp4")
    assert (mx.weights.group_size, mx.activations.group_size) == (32, 32)
    back = nv.with_flat({"w_format": "int", "a_format": "int"})  # back to INT: INT's defaults again
    assert (back.weights.layout, back.activations.granularity, back.activations.group_size) == ("channel", "token", 64)
    for bad, match in ((dict(a_bits=8, a_format="nvfp4"), "4-bit"), (dict(w_bits=3, w_format="mxfp4"), "4-bit"),
                       (dict(a_bits=4, a_format="nvfp4", act_group_size=32), "blocks of 16"),
                       (dict(w_format="nvfp4", weight_layout="channel", group_size=16), "blocks of 16"),
                       (dict(a_format="fp8"), "format must be one of"), (dict(act_group_size=0), "group size")):
        with pytest.raises(ConfigError, match=match):
            recipe_config("ditas", **bad)


def test_cli_options_give_the_formats() -> None:
    from ditas.cli._args import add_quant_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_quant_arguments(p)
    cfg = config_from_args(p.parse_args(["--a-bits", "4"]), "ditas")
    assert (cfg.activations.bits, cfg.activations.granularity) == (4, "token")
    cfg = config_from_args(p.parse_args(["--a-bits", "4", "--act-granularity", "group", "--act-group-size", "32"]),
                           "rtn")
    assert (cfg.activations.granularity, cfg.activations.group_size) == ("group", 32)
    cfg = config_from_args(p.parse_args(["--w-format", "mxfp4", "--a-format", "nvfp4", "--a-bits", "4"]), "ditas")
    assert (cfg.weights.format, cfg.weights.group_size, cfg.activations.format) == ("mxfp4", 32, "nvfp4")


# -- kernels ----------------------------------------------------------------------------------------


def _linear(k: int = 64, n: int = 24, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g))
    return lin


@pytest.mark.parametrize("w,a,why", [
    (WeightFormat(4, format="nvfp4"), ActivationFormat(4, format="nvfp4"), "INT weights, the layer has nvfp4"),
    (WeightFormat(4), ActivationFormat(4, format="mxfp4"), "INT activations, the layer has mxfp4"),
    (WeightFormat(4), ActivationFormat(4, "group"), "per-token activations, the layer has per-group"),
])
def test_group_and_fp4_layers_run_simulated(w, a, why) -> None:
    lin = _linear()
    layer = QuantLinear.from_linear(lin, w, a)
    for name in ("int_mm", "onednn"):
        assert why in KERNELS[name].supports(layer)
        with pytest.raises(ConfigError, match=why):
            choose(layer, name)
    model = nn.Sequential(layer)
    assert use_kernels(model, "auto") == {"0": "simulated"}
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    # the simulated kernel: the format's fake-quantized input times its dequantized weight
    deq = weight_quantizer(w)(lin.weight.detach())[1]
    want = torch.nn.functional.linear(activation_quantizer(a)(x.reshape(-1, 64)), deq, lin.bias).reshape(3, 5, 24)
    assert torch.equal(layer.dequantized_weight(), deq)
    assert torch.allclose(layer(x), want, rtol=0, atol=1e-6)


@needs_int_kernel
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_int4_per_token_runs_on_the_integer_kernels_as_simulated(lora_rank) -> None:
    lin = _linear(96, 40, seed=3)
    g = torch.Generator().manual_seed(5)
    lora = {} if not lora_rank else dict(lora_down=torch.randn(lora_rank, 96, generator=g) * 0.1,
                                         lora_up=torch.randn(40, lora_rank, generator=g) * 0.1)
    layer = QuantLinear.from_linear(lin, WeightFormat(4), ActivationFormat(4), smooth=torch.rand(96, generator=g) + 0.5,
                                    **lora)
    assert layer.activation_format.granularity == "token"
    x = torch.randn(2, 9, 96, generator=g) * 3 + 0.5
    simulated = layer(x)
    codes, _, _ = layer.quantize_input(x.reshape(-1, 96))
    assert int(codes.max()) <= 15
    for kernel in integer_kernels():
        assert use_kernels(nn.Sequential(layer), "auto")["0"] in integer_kernels()
        layer.set_kernel(kernel)
        for y in (layer(x), int_forward(layer, x, kernel=kernel)):
            rel = float((y.double() - simulated.double()).norm() / simulated.double().norm())
            assert rel < 2e-6, (kernel, rel)
        layer.set_kernel("simulated")


# -- checkpoints ------------------------------------------------------------------------------------

FORMATS = {
    "nvfp4": dict(recipe="ditas_nvfp4"),
    "mxfp4": dict(recipe="ditas", w_bits=4, a_bits=4, w_format="mxfp4", a_format="mxfp4"),
    "int4_group32": dict(recipe="ditas", w_bits=4, a_bits=4, act_granularity="group", act_group_size=32),
    "int4_token": dict(recipe="ditas", w_bits=4, a_bits=4),
    "nvfp4_w_int8_a": dict(recipe="rtn", w_bits=4, a_bits=8, w_format="nvfp4"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_new_formats_save_and_load_bit_exact(tmp_path, name) -> None:
    from safetensors.torch import load_file

    spec = dict(FORMATS[name])
    recipe = spec.pop("recipe")
    cfg = recipe_config(recipe, steps=2, calib_labels=2, lora_rank=4, lora_rounds=2, alpha_grid=(0.25, 0.75), **spec)
    q, _ = quantize(random_dit(4, depth=1), cfg, progress=False, kernel="auto")
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    table = json.loads((out / "config.json").read_text())["quantization"]
    assert table["format_version"] == 5
    saved = load_file(str(out / "model.safetensors"))
    for lname, m in ckpt.quant_layers(q).items():
        meta = table["layers"][lname]
        w, a = m.weight_format, m.activation_format
        assert (meta["w_format"], meta["a_format"], meta["act_granularity"], meta["act_group_size"]) == \
            (w.format, a.format, a.granularity, a.group_size)
        assert saved[f"{lname}.qweight"].numel() == m.in_features * m.out_features // 2  # 2 codes per byte
        if w.format == "int":
            assert saved[f"{lname}.wscale"].dtype == torch.float32 and f"{lname}.wzero" in saved
        else:
            assert saved[f"{lname}.wscale"].dtype == torch.uint8 and f"{lname}.wzero" not in saved
            assert saved[f"{lname}.wscale"].shape == (m.out_features, m.in_features // w.group_size)
            assert (f"{lname}.wtscale" in saved) == (w.format == "nvfp4")
    loaded = ditas.load_dit(out, kernel="auto")
    a_state, b_state = q.state_dict(), loaded.state_dict()
    assert a_state.keys() == b_state.keys()
    for k in a_state:
        assert a_state[k].dtype == b_state[k].dtype and torch.equal(a_state[k], b_state[k]), k
    kernels = {m.kernel for m in ckpt.quant_layers(loaded).values()}
    if name != "int4_token" or not integer_kernels():
        assert kernels == {"simulated"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(q(x, t, y), loaded(x, t, y))


def test_checkpoint_refuses_too_new_versions_and_bad_scale_bits(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    cfg = recipe_config("ditas_nvfp4", steps=2, calib_labels=2, lora_rank=0, search=False)
    q, _ = quantize(random_dit(5, depth=1), cfg, progress=False, kernel="simulated")
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    data = json.loads((out / "config.json").read_text())
    data["quantization"]["format_version"] = max(ckpt.READABLE_VERSIONS) + 1
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"format version {max(ckpt.READABLE_VERSIONS) + 1} is not supported") as exc:
        ditas.load_dit(out)
    assert "\n" not in str(exc.value)
    data["quantization"]["format_version"] = ckpt.FORMAT_VERSION
    (out / "config.json").write_text(json.dumps(data))
    state = load_file(str(out / "model.safetensors"))
    key = next(k for k in state if k.endswith(".wscale") and state[k].dtype == torch.uint8)
    state[key][0, 0] = 0x7F  # an E4M3 NaN
    save_file(state, str(out / "model.safetensors"), metadata={"format": "ditas-quantized"})
    with pytest.raises(CheckpointError, match="NaN pattern") as exc:
        ditas.load_dit(out)
    assert key in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_diffusers_save_pretrained_and_from_pretrained_are_bit_equal(tmp_path, fmt) -> None:
    pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    from quant_helpers import tiny_diffusers_dit

    t = tiny_diffusers_dit(0)
    ditas.quantize_(t, recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4, lora_rounds=2, w_bits=4,
                                     a_bits=4, w_format=fmt, a_format=fmt))
    t.save_pretrained(tmp_path / "t")
    saved = load_file(str(next((tmp_path / "t").glob("*.safetensors"))))
    assert any(k.endswith(".wscale") and v.dtype == torch.uint8 for k, v in saved.items())
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    for back in (type(t).from_pretrained(tmp_path / "t"), ditas.load_quantized(tmp_path / "t")):
        a_state, b_state = t.state_dict(), back.state_dict()
        assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
        with torch.no_grad():
            for step in (900, 100):
                ts = torch.tensor([step, step])
                assert torch.equal(back(x, timestep=ts, class_labels=y).sample, t(x, timestep=ts, class_labels=y).sample)


def test_compare_rows_name_the_fp4_recipe() -> None:
    from ditas.quantization.recipes import parse_recipes

    assert parse_recipes("fp,ditas_nvfp4,rtn@w4a4", None, None) == [
        ("fp", "fp", None, None), ("ditas_nvfp4@w4a4", "ditas_nvfp4", 4, 4), ("rtn@w4a4", "rtn", 4, 4)]
    with pytest.raises(ConfigError, match="4-bit"):
        recipe_config("ditas_nvfp4", a_bits=8)


@pytest.mark.parametrize("spec", [dict(a_format="nvfp4", w_format="nvfp4"), dict(act_granularity="group"),
                                  dict(a_format="mxfp4", w_format="mxfp4")])
def test_the_search_scores_what_the_layer_computes_on_a_token_subsample(spec) -> None:
    """The search quantizes a subsample of each step's tokens; NVFP4's tensor scale still comes
    from all of them, so each scored token is quantized exactly as the full batch quantizes it."""
    from ditas.calibration.inputs import LayerInputs
    from ditas.quantization.search import _quant_inputs

    cfg = recipe_config("rtn", w_bits=4, a_bits=4, **spec)
    g = torch.Generator().manual_seed(2)
    full = [torch.randn(40, 64, generator=g) * (1 + 9 * (t == 1)) for t in range(2)]
    for x in full:
        x[1, 0] = 100.0  # the largest input lies outside the subsample
    keep = torch.arange(0, 40, 3)
    inputs = LayerInputs([x[keep] for x in full], torch.stack([x.amin(0) for x in full]),
                         torch.stack([x.amax(0) for x in full]), torch.cat(full).abs().amax(0))
    s = torch.rand(64, generator=g) + 0.5
    got = _quant_inputs(inputs, 2, s, cfg)
    quant = activation_quantizer(cfg.activations)
    assert torch.equal(got, torch.cat([quant(x / s)[keep] for x in full]))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fake_quant_equals_dequantized_codes(fmt) -> None:
    from ditas.quantization.fp4 import fake_quant_fp4

    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(9)) * torch.logspace(-3, 3, 64)
    x[0, :32] = 0.0
    x[1, 0] = -1e-30  # rounds to (+)0
    want = dequantize_fp4(*quantize_fp4(x, fmt))
    got = fake_quant_fp4(x, fmt)
    assert torch.equal(got, want) and not torch.signbit(got[1, 0])
