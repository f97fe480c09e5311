"""PixArt, SD3 (3.0 and 3.5 dual attention) and Flux transformers from diffusers, quantized in
place through their adapters: folds exact, block-wise replay exact, W4A8 ditas better than the
baselines, checkpoints bit-exact. Tiny random models built in the test (``family_models``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ditas.calibration.blockwise import block_layer_inputs
from ditas.calibration.recording import record_calibration
from ditas.errors import CalibrationError
from ditas.model.adapters.base import ROLES
from ditas.model.adapters.registry import adapter_for
from ditas.quantization.apply import quantize
from ditas.quantization.checkpoint import load_quantized, save_quantized
from ditas.quantization.kernels import use_kernels
from ditas.quantization.linear import QuantLinear
from ditas.quantization.recipes import recipe_config
from ditas.quantization.smoothing import OnTheFlySmooth, apply_fold
from ditas.quantization.weight_only import WeightOnlyInt8Linear
from quant_helpers import needs_int_kernel
import family_models as fm

BUILDERS = {
    "pixart": fm.tiny_pixart,
    "sd3": fm.tiny_sd3,
    "sd35": lambda seed=0: fm.tiny_sd3(seed, dual_attention_layers=(0,)),
    "flux": fm.tiny_flux,
    "flux_fused": lambda seed=0: _fused(fm.tiny_flux(seed)),
}
# the fold kinds each family must use (an adapter that silently fell back to on the fly fails)
FOLD_KINDS = {
    "pixart": {"prev_rows", "on_the_fly"},
    "sd3": {"adaln_rows", "on_the_fly"},
    "sd35": {"adaln_rows", "prev_rows", "on_the_fly"},
    "flux": {"adaln_rows", "on_the_fly"},
    "flux_fused": {"adaln_rows", "on_the_fly"},
}
ADAPTER_FAMILY = {"pixart": "pixart", "sd3": "sd3", "sd35": "sd3", "flux": "flux", "flux_fused": "flux"}
SMALL = dict(lora_rank=4, lora_rounds=2)  # a small LoRA for 16-wide layers


def _fused(model):
    model.fuse_qkv_projections()
    return model


rel, _record, _outputs = fm.rel, fm.record, fm.outputs  # shared with the other family tests


@pytest.mark.parametrize("family", list(BUILDERS))
def test_adapter_lists_every_block_linear_once(family):
    m = BUILDERS[family]()
    ad = adapter_for(m)
    assert ad.family == ADAPTER_FAMILY[family]
    names = [lin.name for lin in ad.linears()]
    assert len(names) == len(set(names))
    assert all(lin.role in ROLES for lin in ad.linears())
    # every block linear that a forward calls (fused models keep unused separate projections)
    in_blocks: set[str] = set()
    hooks = [mod.register_forward_hook(lambda *_, n=n: in_blocks.add(n)) for n, mod in m.named_modules()
             if isinstance(mod, nn.Linear) and "blocks." in n]
    _outputs(m, steps=1)
    for h in hooks:
        h.remove()
    assert set(names) | (set(ad.weight_only_linears()) & in_blocks) == in_blocks
    assert not set(names) & set(ad.weight_only_linears())
    assert all(isinstance(m.get_submodule(n), nn.Linear) for n in ad.weight_only_linears())
    assert [b.index for b in ad.blocks()] == list(range(len(ad.blocks())))
    for b in ad.blocks():  # members of a group read one input: same width
        for g in b.groups:
            assert len({m.get_submodule(x.name).in_features for x in g.members}) == 1


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_folded_smoothing_without_quantization_equals_fp(family, seed):
    """Every group's input divided by a random factor, made free as its fold says (adaLN rows,
    previous linear's rows) or applied on the fly: the output equals FP's within 1e-5."""
    m = BUILDERS[family](seed)
    ad = adapter_for(m)
    folded = copy.deepcopy(m)
    g = torch.Generator().manual_seed(100 + seed)
    kinds = set()
    with torch.no_grad():
        for b in ad.blocks():
            for grp in b.groups:
                first = folded.get_submodule(grp.members[0].name)
                s = torch.rand(first.in_features, generator=g) * 4 + 0.05
                kinds.add(grp.fold.kind)
                if grp.fold.kind == "on_the_fly":
                    for x in grp.members:
                        folded.set_submodule(x.name, OnTheFlySmooth(folded.get_submodule(x.name), s))
                else:
                    for x in grp.members:
                        folded.get_submodule(x.name).weight.mul_(s[None, :])
                    apply_fold(folded, grp.fold, s)
    assert kinds == FOLD_KINDS[family]
    for ref, out in zip(_outputs(m), _outputs(folded)):
        assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("family", list(BUILDERS))
def test_blockwise_replay_gives_the_layer_inputs_of_a_full_forward(family):
    """From the first block's recorded calls, block by block (``next_call`` across stacks), every
    group's inputs equal those a per-layer observation of full forwards sees."""
    m = BUILDERS[family]()
    ad = adapter_for(m)
    kwargs = [fm.call_kwargs(m, seed=2, step=s) for s in range(3)]
    observed: dict[str, list[torch.Tensor]] = {}
    handles = []
    for b in ad.blocks():
        for grp in b.groups:
            name = grp.members[0].name
            handles.append(m.get_submodule(name).register_forward_pre_hook(
                lambda mod, args, name=name: observed.setdefault(name, []).append(args[0].detach().clone())))
    with torch.no_grad(), record_calibration(m) as calib:
        for kw in kwargs:
            m(**kw)
    for h in handles:
        h.remove()
    calls = calib.calls
    assert len(calls) == 3 and calib.model_calls == 3
    for b in ad.blocks():
        rels = [grp.members[0].rel for grp in b.groups]
        inputs, outs = block_layer_inputs(ad.block_module(b), b.name, rels, calls)
        for grp in b.groups:
            got = inputs[grp.members[0].rel].xs
            want = [x.reshape(-1, x.shape[-1]) for x in observed[grp.members[0].name]]
            assert len(got) == len(want) == 3
            for a, w in zip(got, want):
                assert torch.equal(a, w.float()), grp.name
        calls = [ad.next_call(b, c, y) for c, y in zip(calls, outs)]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_w4a8_ditas_beats_rtn_and_smoothquant(family):
    m = BUILDERS[family]()
    calib = _record(m, steps=4)
    refs = _outputs(m)
    err = {}
    for recipe, small in (("rtn", {}), ("smoothquant", {}), ("ditas", SMALL)):  # the baselines as published
        q, report = quantize(m, recipe_config(recipe, w_bits=4, a_bits=8, **small), calib,
                             progress=False)
        err[recipe] = sum(rel(o, r) for o, r in zip(_outputs(q), refs)) / len(refs)
        assert report["num_layers"] == len({grp.name for b in adapter_for(m).blocks() for grp in b.groups})
    assert err["ditas"] < 0.7 * min(err["rtn"], err["smoothquant"]), err


@pytest.fixture(scope="module", params=list(BUILDERS))
def quantized_family(request):
    m = BUILDERS[request.param]()
    q, _ = quantize(m, recipe_config("ditas", **SMALL), _record(m), progress=False)
    return request.param, m, q


def test_quantized_in_place_inside_the_diffusers_class(quantized_family):
    family, fp, q = quantized_family
    assert type(q) is type(fp)
    ad = adapter_for(q)
    assert all(isinstance(q.get_submodule(lin.name), QuantLinear) for lin in adapter_for(fp).linears())
    assert all(isinstance(q.get_submodule(n), WeightOnlyInt8Linear) for n in ad.weight_only_linears())
    # the diffusers forward still runs end to end and stays close to FP
    for out, ref in zip(_outputs(q), _outputs(fp)):
        assert out.shape == ref.shape and rel(out, ref) < 0.5


@pytest.mark.parametrize("kernel", ["simulated", "auto"])
def test_save_load_forward_is_bit_exact(tmp_path, quantized_family, kernel):
    family, _, q = quantized_family
    out = save_quantized(q, tmp_path / family)
    loaded = load_quantized(out, kernel=kernel)
    assert type(loaded) is type(q)
    use_kernels(q, kernel)
    try:
        for a, b in zip(_outputs(loaded), _outputs(q)):
            assert torch.equal(a, b)
    finally:
        use_kernels(q, "simulated")


@needs_int_kernel
def test_int_kernel_agrees_with_the_simulated_path(tmp_path, quantized_family):
    family, fp, q = quantized_family
    out = save_quantized(q, tmp_path / family)
    fake, real = load_quantized(out, kernel="simulated"), load_quantized(out, kernel="auto")
    assert any(isinstance(mod, QuantLinear) and mod.kernel in ("onednn", "int_mm") and mod.kernel_entry.supports(mod) is None
               for mod in real.modules())
    for a, b, ref in zip(_outputs(real), _outputs(fake), _outputs(fp)):
        # much closer to each other than either is to FP (the quantization error)
        assert rel(a, b) < 1e-3 and rel(a, b) < 0.05 * rel(b, ref)


def test_recorder_keeps_first_block_calls_and_leaves_the_model_alone():
    m = fm.tiny_flux()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad(), record_calibration(m) as calib:
        for s in range(3):
            m(**fm.call_kwargs(m, step=s))
    assert calib.model_calls == 3 and calib.steps == 3
    assert set(calib.calls[0].kwargs) >= {"hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"}
    assert not m.transformer_blocks[0]._forward_pre_hooks and not m._forward_pre_hooks
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    with record_calibration(m) as empty:
        pass
    with pytest.raises(CalibrationError, match="no calls"):
        quantize(m, recipe_config("rtn"), empty, progress=False)
    with pytest.raises(CalibrationError, match="calibration record"):
        quantize(m, recipe_config("rtn"), [torch.zeros(1)], progress=False)
    with pytest.raises(CalibrationError, match="record_calibration"):  # no self-calibration for pipelines
        quantize(m, recipe_config("rtn"), None, progress=False)
