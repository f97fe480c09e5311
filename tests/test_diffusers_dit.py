"""diffusers' DiTTransformer2DModel (untied per-block embedders) quantized in place through the seam."""

from __future__ import annotations

import copy

import pytest
import torch

import ditas
from ditas.calibration.blockwise import block_layer_inputs
from ditas.errors import CheckpointError
from ditas.model.adapters.registry import adapter_for
from ditas.quantization.apply import calibrate
from ditas.quantization.linear import QuantLinear
from quant_helpers import class_loop_calls, fold_smoothing_in_float, needs_int_kernel, tiny_diffusers_dit

pytest.importorskip("diffusers")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _held_out(seed=123, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([900, 500, 50][:n]), torch.randint(0, 10, (n,), generator=g)


def _out(model, inputs):
    x, t, y = inputs
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def test_the_test_model_has_untied_embedders_that_load_dit_refuses(tmp_path):
    m = tiny_diffusers_dit(0)
    e0, e1 = (m.transformer_blocks[i].norm1.emb.timestep_embedder.linear_1.weight for i in (0, 1))
    assert not torch.equal(e0, e1)
    m.save_pretrained(tmp_path / "dit")
    with pytest.raises(CheckpointError, match="own timestep_embedder"):
        ditas.load_dit(tmp_path / "dit")
    assert adapter_for(m).family == "diffusers-dit"


@pytest.mark.parametrize("seed", [0, 1])
def test_every_fold_kind_leaves_the_float_function_unchanged(seed):
    """Smoothing folded (adaLN rows, to_v rows, on the fly) with quantization switched off
    (float weights, W * s) gives the FP output within 1e-5 relative."""
    m = tiny_diffusers_dit(seed)
    with ditas.record_calibration(m) as calib:
        class_loop_calls(m, steps=3, seed=seed)
    cal = calibrate(m, ditas.recipe_config("tas", a_bits=16, search_tokens=None), calib, progress=False)
    kinds = {cal.folds[g.name].kind for b in cal.plan for g in b.groups}
    assert kinds == {"adaln_rows", "prev_rows", "on_the_fly"}
    assert all(r.smooth is not None for r in cal.layers.values())
    folded = fold_smoothing_in_float(copy.deepcopy(m), cal)
    assert not torch.equal(folded.transformer_blocks[0].norm1.linear.weight, m.transformer_blocks[0].norm1.linear.weight)
    inputs = _held_out(seed)
    assert _rel(_out(folded, inputs), _out(m, inputs)) < 1e-5


def test_blockwise_replay_gives_the_layer_inputs_of_per_layer_observation():
    m = tiny_diffusers_dit(2)
    adapter = adapter_for(m)
    blocks = adapter.blocks()
    firsts = {g.members[0].name: g for b in blocks for g in b.groups}
    observed = {name: [] for name in firsts}
    hooks = [m.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, name=name: observed[name].append(args[0].reshape(-1, args[0].shape[-1]).clone()))
        for name in firsts]
    with ditas.record_calibration(m) as calib:
        class_loop_calls(m, steps=3, seed=5)
    for h in hooks:
        h.remove()
    assert calib.model_calls == 3 and calib.steps == 3
    calls = calib.calls
    for i, b in enumerate(blocks):
        block = m.get_submodule(b.name)
        inputs, outs = block_layer_inputs(block, b.name, [g.members[0].rel for g in b.groups], calls)
        for g in b.groups:
            got = inputs[g.members[0].rel].xs
            want = observed[g.members[0].name]
            assert len(got) == len(want) == 3
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        calls = [adapter.next_call(b, c, y) for c, y in zip(calls, outs)]


def test_w4a8_ditas_beats_rtn_and_smoothquant():
    m = tiny_diffusers_dit(3)
    with ditas.record_calibration(m) as calib:
        class_loop_calls(m, steps=4, seed=3)
    inputs = _held_out(7)
    ref = _out(m, inputs)
    errs = {}
    for recipe in ("rtn", "smoothquant", "ditas"):
        q = copy.deepcopy(m)
        cfg = ditas.recipe_config(recipe, lora_rank=4, lora_rounds=3, adaln="float") if recipe == "ditas" \
            else ditas.recipe_config(recipe, adaln="float")
        report = ditas.quantize_(q, cfg, calib)
        assert report["num_layers"] == 4 * 2  # groups: proj, fc2, q/k/v, fc1 per block
        assert isinstance(q.transformer_blocks[1].attn1.to_k, QuantLinear)
        errs[recipe] = _rel(_out(q, inputs), ref)
    assert errs["ditas"] < errs["rtn"] and errs["ditas"] < errs["smoothquant"], errs


@pytest.mark.parametrize("kernel", ["simulated", "auto"])
def test_save_load_forward_is_bit_exact(tmp_path, kernel):
    m = tiny_diffusers_dit(4)
    cfg = ditas.recipe_config("ditas", steps=3, calib_labels=2, lora_rank=4, lora_rounds=2, alpha_grid=(0.3, 0.6))
    report = ditas.quantize_(m, cfg, kernel=kernel)  # no calib: the model samples its own run
    assert report["forward_passes"]["batch_per_pass"] == 4  # 2 labels + their null labels
    assert type(m.transformer_blocks[0].norm1.linear).__name__ == "WeightOnlyInt8Linear"
    ditas.save_quantized(m, tmp_path / "q")
    back = ditas.load_quantized(tmp_path / "q", device="cpu", kernel=kernel)
    assert type(back) is type(m)
    inputs = _held_out(9)
    assert torch.equal(_out(back, inputs), _out(m, inputs))
    a, b = m.transformer_blocks[1].norm1.emb, back.transformer_blocks[1].norm1.emb
    assert torch.equal(a.timestep_embedder.linear_1.weight, b.timestep_embedder.linear_1.weight)


@needs_int_kernel
def test_int_kernel_agrees_with_the_simulated_path(tmp_path):
    m = tiny_diffusers_dit(5)
    fp = copy.deepcopy(m)
    with ditas.record_calibration(m) as calib:
        class_loop_calls(m, steps=3, seed=5)
    ditas.quantize_(m, ditas.recipe_config("ditas", lora_rank=4, lora_rounds=2, alpha_grid=(0.3, 0.6)), calib)
    ditas.save_quantized(m, tmp_path / "q")
    fake = ditas.load_quantized(tmp_path / "q", kernel="simulated")
    real = ditas.load_quantized(tmp_path / "q", kernel="auto")
    assert any(isinstance(mod, QuantLinear) and mod.kernel in ("onednn", "int_mm") and mod.kernel_entry.supports(mod) is None for mod in real.modules())
    inputs = _held_out(11)
    a, b, ref = _out(real, inputs), _out(fake, inputs), _out(fp, inputs)
    # much closer to each other than either is to FP (the quantization error)
    assert _rel(a, b) < 1e-3 and _rel(a, b) < 0.05 * _rel(b, ref)


def test_previous_rows_fold_lands_on_the_right_member_of_a_stacked_group():
    """The attention output's factor divides to_v's rows, the third member of the q/k/v group:
    the stacked weight carries it in rows 2D..3D only, and the loss maps those rows back by s."""
    from ditas.quantization.apply import _stacked, prepare

    m = tiny_diffusers_dit(6)
    b = prepare(m, ditas.recipe_config("ditas"))[0]
    qkv = next(g for g in b.groups if g.role == "qkv")
    assert [s.rel for s in qkv.members] == ["attn1.to_q", "attn1.to_k", "attn1.to_v"]
    d = m.transformer_blocks[0].attn1.to_v.out_features
    s = torch.rand(d) + 0.5
    w, bias, out_scale = _stacked(m, qkv, {"transformer_blocks.0.attn1.to_v": (slice(0, d), s)})
    a = m.transformer_blocks[0].attn1
    torch.testing.assert_close(w[:d], a.to_q.weight.detach())
    torch.testing.assert_close(w[d:2 * d], a.to_k.weight.detach())
    torch.testing.assert_close(w[2 * d:], a.to_v.weight.detach() / s[:, None])
    torch.testing.assert_close(bias[2 * d:], a.to_v.bias.detach() / s)
    assert torch.equal(out_scale[:2 * d], torch.ones(2 * d)) and torch.equal(out_scale[2 * d:], s)
