"""The generic adapter: structure from one recorded call, quality against the hand-written
adapters, models no adapter knows, segments, skip patterns, the disk cache, checkpoints."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch
from torch import nn

import ditas
from ditas.calibration.recording import record_calibration
from ditas.errors import CalibrationError, CheckpointError, ConfigError
from ditas.model.adapters.base import BlockCall
from ditas.model.adapters.generic import GenericAdapter
from ditas.model.adapters.generic_probe import block_candidates
from ditas.model.adapters.registry import adapter_for, hand_written_adapter
from ditas.quantization.apply import quantize, record
from ditas.quantization.checkpoint import load_quantized, save_quantized
from ditas.quantization.linear import QuantLinear
from ditas.quantization.recipes import parse_recipes, recipe_config
from ditas.quantization.weight_only import WeightOnlyInt8Linear
from quant_helpers import random_dit
import family_models as fm

_record, _outputs = fm.record, fm.outputs  # the tiny families' record and held-out outputs

SMALL = dict(lora_rank=4, lora_rounds=2)


def psnr(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """PSNR of outputs against the FP outputs, the peak being the FP outputs' range."""
    mse = sum(((o.double() - r.double()) ** 2).mean().item() for o, r in zip(outs, refs)) / len(refs)
    peak = max((r.double().amax() - r.double().amin()).item() for r in refs)
    return 10 * math.log10(peak ** 2 / mse)


def _generic(recipe: str = "ditas", **kw):
    return recipe_config(recipe, adapter="generic", **({**SMALL, **kw} if recipe == "ditas" else kw))


@pytest.mark.parametrize("family", list(fm.FAMILIES))
def test_probe_finds_the_hand_written_blocks_groups_and_roles(family):
    """Blocks, smoothing groups (who shares one input) and roles found by hooks alone are those
    the hand-written adapter names; its adaLN linears inside blocks are the weight-only ones."""
    m = fm.FAMILIES[family]()
    calib = _record(m, steps=2)
    hand = hand_written_adapter(m)
    gen = GenericAdapter(m, calib.structure)
    assert [b.name for b in gen.blocks()] == [b.name for b in hand.blocks()]
    for hb, gb in zip(hand.blocks(), gen.blocks()):
        assert {(frozenset(m.rel for m in g.members), g.role) for g in hb.groups} == \
               {(frozenset(m.rel for m in g.members), g.role) for g in gb.groups}, hb.name
    assert set(gen.weight_only_linears()) <= set(hand.weight_only_linears())
    assert calib.structure.segment_starts == [hand.blocks()[0].name]  # a pure chain: one segment
    assert calib.segments[hand.blocks()[0].name] is calib.calls  # shared with the hand-written record


@pytest.mark.parametrize("family", list(fm.FAMILIES))
def test_generic_is_within_half_a_db_of_the_hand_written_adapter(family):
    """Same calibration record, same held-out inputs: the generic adapter's W4A8 ditas output
    PSNR against FP is within 0.5 dB of the hand-written adapter's, and beats rtn."""
    m = fm.FAMILIES[family]()
    calib = _record(m, steps=4)
    refs = _outputs(m)
    hand, _ = quantize(m, recipe_config("ditas", **SMALL), calib, progress=False)
    gen, report = quantize(m, _generic(), calib, progress=False)
    rtn, _ = quantize(m, _generic("rtn"), calib, progress=False)
    p_hand, p_gen, p_rtn = psnr(_outputs(hand), refs), psnr(_outputs(gen), refs), psnr(_outputs(rtn), refs)
    assert gen.quant_family == "generic" and hand.quant_family != "generic"
    assert p_gen > p_hand - 0.5, (p_gen, p_hand)
    assert p_gen > p_rtn + 3, (p_gen, p_rtn)
    assert set(report["adapter"]["blocks"].values()) <= {"replayed", "recorded inputs (the first block)"}


def test_replay_gives_each_block_the_call_of_a_full_forward():
    """The transitions found on the probe, applied to block i's call and output, give block
    i + 1's call of an unseen forward (checked on Flux: double then single blocks)."""
    m = fm.tiny_flux()
    gen = GenericAdapter(m, _record(m, steps=2).structure)
    blocks = gen.blocks()
    seen = {}
    def keep(name):
        def hook(mod, args, kwargs):
            seen.setdefault(name, BlockCall(args, kwargs).detached())
        return hook

    handles = [m.get_submodule(b.name).register_forward_pre_hook(keep(b.name), with_kwargs=True) for b in blocks]
    try:
        _outputs(m, seed=11, steps=1)
    finally:
        for h in handles:
            h.remove()
    call = seen[blocks[0].name]
    for b, nxt in zip(blocks, blocks[1:]):
        with torch.no_grad():
            call = gen.next_call(b, call, m.get_submodule(b.name)(*call.args, **call.kwargs))
        real = seen[nxt.name]
        assert torch.allclose(call.kwargs["hidden_states"], real.kwargs["hidden_states"], atol=1e-6)


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.mix = nn.Linear(d, d)  # run twice per call: stays float

    def forward(self, x, scale):
        h = self.norm(x) * (1 + scale[:, None])
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4, -1) @ self.v(h)
        x = x + self.out(a)
        x = x + 0.1 * self.mix(self.mix(x))
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class _Custom(nn.Module):
    """A model no hand-written adapter knows: two stacks with work between them."""

    def __init__(self, d: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.cond = nn.Linear(4, d)
        self.first = nn.ModuleList(_Block(d) for _ in range(depth))
        self.second = nn.ModuleList(_Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 8)

    def forward(self, x, c):
        s = self.cond(c)
        h = self.embed(x)
        for b in self.first:
            h = b(h, s)
        h = h.flip(1) * 0.5  # the model works between the stacks
        for b in self.second:
            h = b(h, s)
        return self.head(h)


def _custom(seed: int = 0):
    torch.manual_seed(seed)
    m = _Custom().eval()
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, nn.Linear) and name.startswith(("first", "second")):
                mod.weight[:, :2] *= 6  # outlier input channels, as trained transformers have
    return m


def _custom_inputs(step: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 100 + step)
    return torch.randn(2, 6, 8, generator=g), torch.randn(2, 4, generator=g)


def _record_custom(m, steps: int = 4, **kw):
    with torch.no_grad(), record_calibration(m, **kw) as calib:
        for s in range(steps):
            m(*_custom_inputs(s))
    return calib


def test_an_unknown_model_needs_a_record_then_quantizes_with_segments(tmp_path):
    m = _custom()
    assert hand_written_adapter(m) is None and adapter_for(m).family == "generic"
    with pytest.raises(CalibrationError, match="record one with ditas.record_calibration"):
        ditas.quantize_(m, "ditas")
    calib = _record_custom(m)
    assert calib.structure.segment_starts == ["first.0", "second.0"]  # the flip starts a segment
    assert len(calib.segments["second.0"]) == 4 == len(calib.calls)
    with torch.no_grad():
        refs = [m(*_custom_inputs(s, seed=5)) for s in range(2)]
    errs = {}
    for recipe in ("rtn", "ditas"):
        q, report = quantize(m, recipe_config(recipe, **(SMALL if recipe == "ditas" else {})), calib, progress=False)
        with torch.no_grad():
            errs[recipe] = sum(((q(*_custom_inputs(s, seed=5)) - r) ** 2).mean().item() for s, r in enumerate(refs))
    assert errs["ditas"] < errs["rtn"], errs
    info = report["adapter"]
    assert info["blocks"]["first.1"] == "replayed" and info["blocks"]["second.0"].startswith("recorded inputs")
    # mix runs twice per call, the embedding and head are outside the blocks: float, with the reason
    assert "2 times" in info["not_quantized"]["first.0.mix"] and "outside" in info["not_quantized"]["head"]
    assert isinstance(q.head, nn.Linear) and isinstance(q.first[0].q, QuantLinear)
    assert {g.name: g.role for g in adapter_for(q).blocks()[0].groups} == {
        "first.0.out": "proj", "first.0.q": "qkv", "first.0.fc1": "fc1", "first.0.fc2": "fc2"}
    assert adapter_for(q).blocks()[0].groups[0].fold.kind == "prev_rows"  # out's factor into v's rows, proven
    with pytest.raises(CheckpointError, match="cannot be rebuilt from a config"):
        save_quantized(q, tmp_path / "q")
    assert not (tmp_path / "q").exists()


class _BlockWithAnEmptyLinear(_Block):
    def __init__(self, d: int):
        super().__init__(d)
        self.empty = nn.Linear(d, 0)

    def forward(self, x, scale):
        return super().forward(x, scale) + self.empty(x).sum(-1, keepdim=True)


def test_a_zero_width_linear_stays_float_with_its_reason():
    """A config can round a layer's width to 0 (diffusers' NucleusMoE test config does for its dense
    MLP): such a linear has nothing to quantize and must not stop the rest."""
    m = _custom()
    for stack in (m.first, m.second):
        for i, block in enumerate(stack):
            stack[i] = _BlockWithAnEmptyLinear(16)
            stack[i].load_state_dict(block.state_dict(), strict=False)
    calib = _record_custom(m)
    q, report = quantize(m, recipe_config("rtn"), calib, progress=False)
    assert report["adapter"]["not_quantized"]["first.0.empty"] == "has no weights (zero input or output features)"
    assert isinstance(q.first[0].q, QuantLinear) and not isinstance(q.first[0].empty, QuantLinear)


def test_skip_patterns_stay_float_and_are_reported():
    m = fm.tiny_pixart()
    calib = _record(m, steps=2)
    q, report = quantize(m, _generic(skip=("*.ff.*",)), calib, progress=False)
    assert isinstance(q.get_submodule("transformer_blocks.0.ff.net.2"), nn.Linear)
    assert not isinstance(q.get_submodule("transformer_blocks.0.ff.net.2"), QuantLinear)
    assert isinstance(q.get_submodule("transformer_blocks.0.attn1.to_q"), QuantLinear)
    assert report["adapter"]["not_quantized"]["transformer_blocks.1.ff.net.0.proj"] == "matches skip pattern '*.ff.*'"
    q2, report2 = quantize(m, recipe_config("ditas", skip=["*.attn1.to_v"], **SMALL), calib, progress=False)
    # the hand-written adapter honours skip too; to_out's fold target stays float: on the fly
    assert not isinstance(q2.get_submodule("transformer_blocks.0.attn1.to_v"), QuantLinear)
    assert "transformer_blocks.0.attn1.to_v" in report2["adapter"]["not_quantized"]


def test_disk_cache_gives_the_same_model_and_is_removed_with_the_record(tmp_path):
    m = _custom()
    mem = _record_custom(m)
    disk = _record_custom(m, calib_cache=tmp_path / "cache")
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 8  # 4 calls of each of the 2 segment starts, nothing else
    cfg = recipe_config("ditas", **SMALL)
    a, _ = quantize(m, cfg, mem, progress=False)
    b, _ = quantize(m, cfg, disk, progress=False)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    del disk
    gc.collect()
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_generic_checkpoint_saves_and_loads_bit_exact(tmp_path, family):
    m = fm.FAMILIES[family]()
    q = m
    report = ditas.quantize_(q, _generic(), _record(m, steps=2))
    assert report["adapter"]["name"] == "generic"
    out = ditas.save_quantized(q, tmp_path / "q")
    data = json.loads((out / "config.json").read_text())
    assert data["family"] == "generic" and data["model"]["class"] == type(m).__name__
    assert data["quantization"]["config"]["scope"]["adapter"] == "generic"
    loaded = ditas.load_quantized(out)
    assert type(loaded) is type(q) and loaded.quant_family == "generic"
    assert any(isinstance(x, WeightOnlyInt8Linear) for x in loaded.modules()) == (family == "flux")
    for a, b in zip(_outputs(loaded), _outputs(q)):
        assert torch.equal(a, b)
    # diffusers' own save_pretrained / from_pretrained round-trip it too
    loaded.save_pretrained(tmp_path / "hf")
    again = type(m).from_pretrained(tmp_path / "hf")
    assert again.quant_family == "generic"
    for a, b in zip(_outputs(again), _outputs(q)):
        assert torch.equal(a, b)


def test_dit_self_calibration_through_the_generic_adapter():
    """A DiT calibrates on its own run; the generic adapter gets its structure from one
    synthetic call, finds the V rows of the fused qkv for proj's factor, and replays the chain."""
    m = random_dit(0, depth=3)
    cfg = recipe_config("ditas", steps=3, calib_labels=2, **SMALL)
    traj = record(m, cfg, progress=False)
    q, report = quantize(m, cfg.replace(scope=type(cfg.scope)(adapter="generic")), traj, progress=False)
    assert report["adapter"]["blocks"] == {"blocks.0": "recorded inputs (the first block)", "blocks.1": "replayed",
                                           "blocks.2": "replayed"}
    proj = adapter_for(q).blocks()[1].groups[0]
    d = m.config.hidden_size
    assert proj.name == "blocks.1.attn.proj" and proj.fold.rows == (2 * d, 3 * d)
    assert report["adapter"]["weight_only"] == [f"blocks.{i}.adaLN_modulation.1" for i in range(3)]


def test_recipe_rows_and_cli_options_select_the_generic_adapter():
    from argparse import ArgumentParser

    from ditas.cli._args import add_quant_arguments, config_from_args

    rows = parse_recipes("fp,ditas,ditas@w4a6+generic", None, None)
    assert rows[2] == ("ditas@w4a6+generic", "ditas+generic", 4, 6)
    p = ArgumentParser()
    add_quant_arguments(p)
    args = p.parse_args(["--skip", "a.*", "--skip", "*.b"])
    cfg = config_from_args(args, "ditas+generic", 4, 6)
    assert (cfg.scope.adapter, cfg.scope.skip, cfg.activations.bits) == ("generic", ("a.*", "*.b"), 6)
    assert config_from_args(args, "ditas").scope.adapter == "auto"
    with pytest.raises(ConfigError, match="adapter must be one of"):
        recipe_config("ditas", adapter="mine")


def test_model_without_repeated_blocks_is_refused_in_one_line():
    with pytest.raises(CalibrationError, match="no repeated blocks"):
        with record_calibration(nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 2))):
            pass
    assert block_candidates(_custom()).keys() == {"first.0", "first.1", "second.0", "second.1"}


PIPELINES = {"pixart": fm.save_tiny_pixart_pipeline, "sd3": fm.save_tiny_sd3_pipeline,
             "flux": fm.save_tiny_flux_pipeline}


@pytest.mark.parametrize("family", list(PIPELINES))
def test_pipeline_outputs_generic_within_half_a_db_of_the_hand_written(tmp_path, family):
    """The user's pipeline, recorded once on calibration prompts; the final latents of held-out
    prompts (same seeds) against FP: the generic adapter within 0.5 dB of the hand-written one."""
    import copy

    from ditas.pipelines import _call_kwargs, load_pipeline, read_prompts, record_pipeline_calibration

    PIPELINES[family](tmp_path / "pipe")
    pipe = load_pipeline(tmp_path / "pipe")
    prompts = read_prompts(None)
    calib = record_pipeline_calibration(pipe, prompts[:4], 4, None, 0, 8, 8, 2, progress=False)
    fp = pipe.transformer

    def latents(transformer) -> list[torch.Tensor]:
        pipe.transformer = transformer
        with torch.no_grad():
            return [pipe(prompt=prompts[10 + i], **_call_kwargs(pipe, 4, None, 5 + i, 8, 8, "latent")).images
                    for i in range(2)]

    refs = latents(fp)
    got = {}
    for adapter in ("auto", "generic"):
        q, _ = quantize(copy.deepcopy(fp), recipe_config("ditas", adapter=adapter, **SMALL), calib, progress=False)
        got[adapter] = psnr(latents(q), refs)
    assert got["generic"] > got["auto"] - 0.5, got


def test_cli_quantizes_a_pipeline_through_the_generic_adapter(tmp_path, capsys):
    from ditas.cli.main import main

    fm.save_tiny_pixart_pipeline(tmp_path / "pipe")
    cache, q = tmp_path / "cache", tmp_path / "q"
    assert main(["quantize", "--model", str(tmp_path / "pipe"), "--out", str(q), "--adapter", "generic",
                 "--skip", "*.ff.net.2", "--calib-cache", str(cache), "--calib-steps", "2", "--calib-prompts", "2",
                 "--lora-rank", "4", "--lora-rounds", "1", "--no-progress"]) == 0
    assert json.loads((q / "config.json").read_text())["family"] == "generic"
    info = json.loads((q / "report.json").read_text())["adapter"]
    assert info["not_quantized"]["transformer_blocks.1.ff.net.2"] == "matches skip pattern '*.ff.net.2'"
    assert "outside" in info["not_quantized"]["proj_out"]
    gc.collect()
    assert cache.is_dir() and list(cache.iterdir()) == []  # the record's folder is gone, the cache kept
    loaded = load_quantized(q)
    assert loaded.quant_family == "generic" and not isinstance(loaded.transformer_blocks[0].ff.net[2], QuantLinear)


def test_cli_quantizes_samples_and_compares_a_dit_through_the_generic_adapter(tmp_path):
    from ditas.cli.main import main

    model_dir, out = tmp_path / "m", tmp_path / "q"
    ditas.save_dit(random_dit(11, depth=2), model_dir)
    small = ["--calib-labels", "3,1", "--calib-steps", "3", "--lora-rank", "4", "--lora-rounds", "1", "--no-progress"]
    assert main(["quantize", "--model", str(model_dir), "--adapter", "generic", *small, "--out", str(out)]) == 0
    data = json.loads((out / "config.json").read_text())
    assert data["family"] == "generic" and data["model"]["library"] == "ditas"
    m = ditas.load_dit(out, kernel="simulated")
    assert isinstance(m.blocks[1].mlp.fc2, QuantLinear) and isinstance(m.blocks[1].adaLN_modulation[1],
                                                                       WeightOnlyInt8Linear)
    assert main(["sample", "--model", str(out), "--kernel", "simulated", "--num", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert main(["compare", "--model", str(model_dir), "--recipes", "fp,ditas,ditas+generic", "--num", "4",
                 "--steps", "3", "--eps-samples", "2", *small, "--out", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())["recipes"]
    assert set(rows) == {"fp", "ditas@w4a8", "ditas@w4a8+generic"} and rows["ditas@w4a8+generic"]["psnr_db"] > 10
