"""Step-dependent activation precision (``QuantConfig.late``, ``quantization/step_precision.py``):
the layers take their late-step activation format exactly at the calls whose timestep is below
the threshold, in every family's timestep units; the late-step output is the output of the same
layers with that format; sampling with the switch equals sampling with the layers switched by
hand; save/load, torch.compile and the integer kernels keep it exact.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import ditas
from ditas.diffusion.run import SamplingSettings, sample_batch
from ditas.errors import ConfigError
from ditas.quantization import checkpoint as ckpt
from ditas.quantization.apply import quantize
from ditas.quantization.config import ActivationFormat, QuantConfig, WeightFormat
from ditas.quantization.linear import QuantLinear
from ditas.quantization.recipes import recipe_config
from ditas.quantization.step_precision import remove_step_precision
import family_models as fm
from quant_helpers import integer_kernels, random_dit

pytestmark = pytest.mark.exactness  # bit-identity between computations of one run: also on other CPU paths

SMALL = dict(steps=3, calib_labels=2, lora_rank=4, lora_rounds=2, alpha_grid=(0.25, 0.75))


def _late_layers(model) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear) and m.late_activation_format is not None]


def _switched_by_hand(model):
    """A copy without the switch whose layers run the late-step format at every call."""
    other = copy.deepcopy(model)
    remove_step_precision(other)
    for mod in other.modules():
        if isinstance(mod, QuantLinear) and mod.late_activation_format is not None:
            mod.activation_format, mod.late_activation_format = mod.late_activation_format, None
    return other


@pytest.fixture(scope="module")
def late_dit():
    cfg = recipe_config("ditas_w4a4_a8late", **SMALL)
    q, _ = quantize(random_dit(3, hidden=64, depth=2), cfg, progress=False)
    return q, cfg


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.arange(batch) % 10


# -- config ---------------------------------------------------------------------------------------
def test_config_late_steps_round_trip_and_refusals():
    cfg = recipe_config("ditas_w4a4_a8late")
    assert (cfg.late.below, cfg.late.a_bits, cfg.activations.bits) == (0.4, 8, 4)
    assert cfg.late_activations() == ActivationFormat(8, "token")
    assert recipe_config("ditas_w4a4").late_activations() is None
    nv = recipe_config("ditas_nvfp4_a8late")
    assert (nv.activations.format, nv.smooth.rotation, nv.late.below, nv.late_activations().bits) == \
        ("nvfp4", "none", 0.4, 8)
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, match in ((dict(late_a_bits=4), "more bits than the others"), (dict(late_below=1.0), r"in \[0, 1\)"),
                       (dict(late_below=-0.1), r"in \[0, 1\)"), (dict(late_a_bits=3), "4..16")):
        with pytest.raises(ConfigError, match=match) as exc:
            recipe_config("ditas_w4a4_a8late", **bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="more bits"):
        QuantLinear(64, 32, WeightFormat(4), ActivationFormat(8), late_activations=ActivationFormat(8))


# -- the layer ------------------------------------------------------------------------------------
def test_a_layer_at_late_steps_is_the_layer_with_the_late_format():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    kw = dict(lora_down=torch.randn(4, 64, generator=g) * 0.1, lora_up=torch.randn(48, 4, generator=g) * 0.1,
              rotation=64)
    a4, a8 = ActivationFormat(4), ActivationFormat(8, "token")
    both = QuantLinear.from_linear(lin, WeightFormat(4), a4, late_activations=a8, **kw)
    early = QuantLinear.from_linear(lin, WeightFormat(4), a4, **kw)
    late = QuantLinear.from_linear(lin, WeightFormat(4), a8, **kw)
    assert "A4 dynamic per-token (A8 dynamic per-token at late steps)" in repr(both)
    x = torch.randn(5, 7, 64, generator=g) * 3
    with torch.no_grad():
        assert torch.equal(both(x), early(x))
        both.at_late_step = True
        assert torch.equal(both(x), late(x))
        assert not torch.equal(late(x), early(x))
        for kernel in integer_kernels():  # int kernel vs simulated, at both phases
            for layer in (both,):
                for phase in (False, True):
                    layer.at_late_step = phase
                    layer.set_kernel("simulated")
                    ref = layer(x)
                    layer.set_kernel(kernel)
                    assert (layer(x) - ref).abs().max() <= 1e-4 * ref.abs().max(), (kernel, phase)


def test_an_fp4_layer_with_late_int8_steps_runs_simulated():
    cfg = recipe_config("ditas_nvfp4", late_below=0.4, late_a_bits=8, **SMALL)
    q, _ = quantize(random_dit(4, hidden=64, depth=1), cfg, progress=False)
    layers = _late_layers(q)
    assert layers and {m.kernel for m in layers} == {"simulated"}
    assert all(m.active_activation_format.format == "nvfp4" for m in layers)
    x, y = _inputs()
    with torch.no_grad():
        late = q(x, torch.tensor([5, 5]), y)
        assert all(m.active_activation_format == ActivationFormat(8, "token") for m in layers)
        assert torch.equal(late, _switched_by_hand(q)(x, torch.tensor([5, 5]), y))


# -- the switch -----------------------------------------------------------------------------------
def test_the_switch_follows_the_timestep_of_each_call(late_dit):
    q, _ = late_dit
    layers = _late_layers(q)
    assert len(layers) == 8  # every quantized linear of the 2 blocks
    x, y = _inputs()
    seen = {}
    with torch.no_grad():
        for t in ((999, 999), (400, 400), (399, 399), (0, 0), (10, 999), (399.5, 10)):
            q(x, torch.tensor(t), y)
            seen[t] = {m.at_late_step for m in layers}
    assert seen == {(999, 999): {False}, (400, 400): {False}, (399, 399): {True}, (0, 0): {True},
                    (10, 999): {False}, (399.5, 10): {True}}
    hand = _switched_by_hand(q)
    t = torch.tensor([100, 100])
    with torch.no_grad():
        assert torch.equal(q(x, t, y), hand(x, t, y))
        assert not torch.equal(q(x, torch.tensor([900, 900]), y), hand(x, torch.tensor([900, 900]), y))


@torch.no_grad()
def test_sampling_with_the_switch_equals_switching_by_hand(late_dit):
    """The guided sampler (``forward_with_cfg`` calls ``forward`` past the model's hooks; the
    switch sits on the timestep embedder) switches at the steps below 400 of 1000."""
    q, _ = late_dit
    labels = torch.tensor([1, 2])
    settings = SamplingSettings(steps=5, cfg_scale=1.5, seed=0)  # timesteps 999, 799, 599, 399, 199
    got = sample_batch(q, labels, settings)
    early, hand = _switched_by_hand(q), _switched_by_hand(q)
    for m in early.modules():  # back to the 4-bit format at every step
        if isinstance(m, QuantLinear):
            m.activation_format = ActivationFormat(4)
    inner, calls = hand.forward_with_cfg, []

    def forward_with_cfg(x, t, *args, **kwargs):
        calls.append(int(t[0]))
        model = hand if int(t[0]) < 400 else early
        return (inner if model is hand else early.forward_with_cfg)(x, t, *args, **kwargs)

    hand.forward_with_cfg = forward_with_cfg
    want = sample_batch(hand, labels, settings)
    assert sum(c < 400 for c in calls) == 2 and len(calls) == 5
    assert torch.equal(got, want)
    assert not torch.equal(got, sample_batch(early, labels, settings))


def test_save_load_keeps_the_schedule_bit_exact(late_dit, tmp_path):
    q, cfg = late_dit
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    meta = json.loads((out / "config.json").read_text())["quantization"]
    assert meta["format_version"] == ckpt.LATE_STEPS_FORMAT_VERSION == 6
    assert {(e["abits"], e["late_abits"], e["late_act_granularity"]) for e in meta["layers"].values()} == \
        {(4, 8, "token")}
    loaded = ditas.load_dit(out)
    assert [m.late_activation_format for m in _late_layers(loaded)] == [m.late_activation_format
                                                                       for m in _late_layers(q)]
    x, y = _inputs()
    with torch.no_grad():
        for t in (999, 100):
            tt = torch.tensor([t, t])
            assert torch.equal(q(x, tt, y), loaded(x, tt, y)), t
            assert {m.at_late_step for m in _late_layers(loaded)} == {t < 400}


def test_a_model_without_late_steps_still_writes_format_5(tmp_path):
    cfg = recipe_config("ditas_w4a4", **SMALL)
    q, _ = quantize(random_dit(3, hidden=64, depth=1), cfg, progress=False)
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    meta = json.loads((out / "config.json").read_text())["quantization"]
    assert meta["format_version"] == ckpt.FORMAT_VERSION == 5
    assert {e["late_abits"] for e in meta["layers"].values()} == {0}


def test_compiled_model_switches_like_eager(late_dit):
    q, _ = late_dit
    model = copy.deepcopy(q)
    x, y = _inputs()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for t in (999, 100, 999):
            tt = torch.tensor([t, t])
            assert (compiled(x, tt, y) - q(x, tt, y)).abs().max() < 1e-5, t
            assert {m.at_late_step for m in _late_layers(model)} == {t < 400}


def test_deep_copies_carry_their_own_switch(late_dit):
    q, _ = late_dit
    other = copy.deepcopy(q)
    x, y = _inputs()
    with torch.no_grad():
        q(x, torch.tensor([999, 999]), y)
        other(x, torch.tensor([5, 5]), y)
    assert {m.at_late_step for m in _late_layers(q)} == {False}
    assert {m.at_late_step for m in _late_layers(other)} == {True}


# -- the families ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(fm.FAMILIES))
def test_text_to_image_families_switch_in_their_own_timestep_units(family):
    """PixArt and SD3 take DDPM timesteps (0..1000), Flux sigma in [0, 1]: ``call_kwargs`` gives
    900, 600, 300 (Flux 0.9, 0.6, 0.3); only the last is below 0.4 of the range."""
    m = fm.FAMILIES[family]()
    calib = fm.record(m, steps=3)
    q, _ = quantize(m, recipe_config("ditas_w4a4_a8late", lora_rank=4, lora_rounds=2), calib, progress=False)
    layers = _late_layers(q)
    assert layers
    hand = _switched_by_hand(q)
    with torch.no_grad():
        for step, late in ((0, False), (1, False), (2, True)):
            kwargs = fm.call_kwargs(q, step=step)
            out = q(**kwargs)[0]
            assert {l.at_late_step for l in layers} == {late}, step
            assert torch.equal(out, hand(**kwargs)[0]) == late, step


def test_the_generic_adapter_refuses_late_steps_before_any_work():
    cfg = recipe_config("ditas_w4a4_a8late", adapter="generic", **SMALL)
    with pytest.raises(ConfigError, match="not through the generic adapter") as exc:
        quantize(random_dit(3, hidden=64, depth=1), cfg, progress=False)
    assert "\n" not in str(exc.value)


def test_a_flux_pipeline_run_switches_at_its_low_sigmas_and_diffusers_save_load_keeps_it(tmp_path):
    """The pipeline calls the transformer with sigma in [0, 1] by keyword: the switch reads it in
    those units (late below 0.4), and ``save_pretrained`` / ``from_pretrained`` restore the switch."""
    from diffusers import DiffusionPipeline

    from ditas.pipelines import generate_images

    fm.save_tiny_flux_pipeline(tmp_path / "fp")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "fp")
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    ditas.quantize_(t, recipe_config("ditas_w4a4_a8late", lora_rank=4, lora_rounds=2), fm.record(t, steps=3))
    layers = _late_layers(t)
    seen = []
    t.register_forward_hook(lambda mod, args, kwargs, out: seen.append(
        (float(kwargs["timestep"].max()), layers[0].at_late_step)), with_kwargs=True)
    generate_images(pipe, "a red fox", steps=6, seed=3, progress=False)
    assert len(seen) == 6 and {late for _, late in seen} == {True, False}
    assert all(late == (sigma < 0.4) for sigma, late in seen), seen
    t.save_pretrained(tmp_path / "q")
    back = type(t).from_pretrained(tmp_path / "q")
    assert _late_layers(back)
    with torch.no_grad():
        for step in (0, 2):
            kwargs = fm.call_kwargs(t, step=step)
            assert torch.equal(t(**kwargs)[0], back(**kwargs)[0]), step
            assert {m.at_late_step for m in _late_layers(back)} == {step == 2}



def test_a_bf16_model_switches_on_its_bf16_timesteps():
    """Real pipelines run in bf16 and pass the timestep in the model's dtype: the switch reads a
    bf16 sigma, and the bf16 model stays within bf16 rounding of the fp32 one at both phases
    (measured relative error 0.023 early, 0.007 late on tiny Flux)."""
    m = fm.tiny_flux()
    q, _ = quantize(m, recipe_config("ditas_w4a4_a8late", lora_rank=4, lora_rounds=2), fm.record(m, steps=3),
                    progress=False)
    half = copy.deepcopy(q).to(torch.bfloat16)
    layers = _late_layers(half)
    with torch.no_grad():
        for step, late in ((0, False), (2, True)):
            kwargs = fm.call_kwargs(q, step=step)
            cast = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and not k.endswith("_ids")
                    else v for k, v in kwargs.items()}
            assert cast["timestep"].dtype == torch.bfloat16
            out = half(**cast)[0]
            assert out.dtype == torch.bfloat16 and {l.at_late_step for l in layers} == {late}, step
            assert fm.rel(out.float(), q(**kwargs)[0]) < 0.05, step
