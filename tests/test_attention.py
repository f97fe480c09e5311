"""The attention cores of ``quantization.attention`` (int8 SageAttention-style, bf16 SDPA) and
``use_attention``, the one call that puts them into a model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ditas.errors import ConfigError, DitasError
from ditas.quantization.attention import (AttentionCore, bf16_attention, int8_attention, int8_scores,
                                          quantize_per_token, use_attention)
from quant_helpers import random_dit


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _qkv(seed: int, b: int, h: int, n: int, d: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) * scale for _ in range(3)]


# ----------------------------------------------------------------------------------------------
#                                  Exact integer parts
# ----------------------------------------------------------------------------------------------


def test_per_token_codes_match_a_straightforward_reference():
    x = torch.randn(3, 5, 7, dtype=torch.float64).float()
    x[0, 1] = 0.0  # an all-zero row: scale 1, codes 0
    codes, scale = quantize_per_token(x)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(5)).tolist():
        row = x[idx[0], idx[1]]
        amax = float(row.abs().max())
        s = amax / 127.0 if amax > 0 else 1.0
        ref = [max(-127, min(127, round(float(v) / s))) for v in row.tolist()]
        assert codes[idx[0], idx[1]].tolist() == ref
        assert math.isclose(float(scale[idx[0], idx[1], 0]), s, rel_tol=1e-6)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 17), st.integers(0, 10 ** 6))
@settings(max_examples=25, deadline=None)
@pytest.mark.exactness
def test_int8_scores_are_exact(g, n, m, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q8 = torch.randint(-127, 128, (g, n, d), generator=gen, dtype=torch.int8)
    k8 = torch.randint(-127, 128, (g, m, d), generator=gen, dtype=torch.int8)
    ref = torch.einsum("gnd,gmd->gnm", q8.long(), k8.long())
    out = int8_scores(q8, k8)
    assert out.dtype == torch.int32 and torch.equal(out.long(), ref)


@pytest.mark.exactness
def test_int8_attention_equals_its_step_by_step_reference():
    """The whole core against the method written out in float64 from the same integer codes: only
    the bf16 roundings of P, V and the output separate them."""
    q, k, v = _qkv(1, 2, 3, 6, 8, scale=2.0)
    out = int8_attention(q, k, v, heads_per_chunk=2)
    km = k - k.mean(dim=-2, keepdim=True)
    q8, sq = quantize_per_token(q)
    k8, sk = quantize_per_token(km)
    scores = (q8.long() @ k8.long().transpose(-1, -2)).double() * sq.double() * sk.double().transpose(-1, -2)
    p = torch.softmax(scores / math.sqrt(8), dim=-1)
    ref = p.to(torch.bfloat16).double() @ v.to(torch.bfloat16).double()
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert _rel(out, ref) < 2 ** -8


def test_int8_attention_does_not_depend_on_the_chunking():
    q, k, v = _qkv(2, 2, 5, 16, 8)
    ref = int8_attention(q, k, v, heads_per_chunk=1)
    for c in (2, 3, 10, 64):
        assert torch.equal(int8_attention(q, k, v, heads_per_chunk=c), ref)


# ----------------------------------------------------------------------------------------------
#                               Agreement with fp32 attention
# ----------------------------------------------------------------------------------------------


@given(st.integers(1, 2), st.integers(1, 4), st.sampled_from([4, 16, 64]), st.sampled_from([8, 16, 72]),
       st.sampled_from([0.5, 1.0, 2.0]), st.integers(0, 10 ** 6))
@settings(max_examples=20, deadline=None)
def test_int8_attention_agrees_with_fp32_sdpa(b, h, n, d, scale, seed):
    """Tolerance: 4e-2 relative (L2 over the output). On N(0, s^2) inputs per-token int8 codes of Q
    and K move each logit by ~1e-2 of its spread; measured 0.5-1.5e-2 at DiT-XL/2 shapes."""
    q, k, v = _qkv(seed, b, h, n, d, scale)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert _rel(int8_attention(q, k, v), ref) < 4e-2


def test_k_smoothing_removes_a_common_key_offset():
    """Softmax ignores a constant added to every logit of a row: a large offset common to all keys
    (which without smoothing would eat the int8 range of K) must not change the result."""
    q, k, v = _qkv(3, 1, 2, 32, 16)
    offset = 20.0 * torch.randn(1, 2, 1, 16)
    ref = F.scaled_dot_product_attention(q, k + offset, v)
    assert _rel(int8_attention(q, k + offset, v), ref) < 4e-2
    assert _rel(int8_attention(q, k + offset, v), int8_attention(q, k, v)) < 1e-2


def test_bf16_attention_agrees_with_fp32_sdpa():
    q, k, v = _qkv(4, 2, 4, 64, 72)
    ref = F.scaled_dot_product_attention(q, k, v)
    out = bf16_attention(q, k, v)
    assert out.dtype == torch.float32
    err = _rel(out, ref)
    assert 0 < err < 1e-2  # not fp32 (0), within bf16's 8 significant bits


# ----------------------------------------------------------------------------------------------
#                                    use_attention on a model
# ----------------------------------------------------------------------------------------------


def _inputs(model, n=4):
    torch.manual_seed(5)
    c = model.config
    return (torch.randn(n, c.in_channels, c.input_size, c.input_size), torch.randint(0, 1000, (n,)),
            torch.randint(0, c.num_classes, (n,)))


@pytest.mark.parametrize("mode,tol", [("bf16", 2e-2), ("int8", 5e-2)])
def test_use_attention_swaps_every_block_and_back(mode, tol):
    model = random_dit(hidden=64, heads=4, depth=3)
    x, t, y = _inputs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x, t, y)
        assert use_attention(model, mode) is model and model.attention_mode == mode
        assert all(isinstance(b.attn.core, AttentionCore) and b.attn.core.mode == mode for b in model.blocks)
        out = model(x, t, y)
        assert model.state_dict().keys() == state.keys()  # no new tensors
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        use_attention(model, "fp32")
        back = model(x, t, y)
    err = _rel(out, ref)
    assert 0 < err < tol
    assert torch.equal(back, ref)  # fp32 is the model as built, exactly
    assert all(b.attn.core is None for b in model.blocks)


@pytest.mark.parametrize("kernel", ["simulated", "auto"])
def test_int8_attention_in_a_quantized_model(kernel):
    from ditas.quantization.apply import quantize
    from ditas.quantization.recipes import recipe_config

    model = random_dit(hidden=64, heads=4, depth=2)
    cfg = recipe_config("ditas", w_bits=4, a_bits=8, steps=3, calib_labels=2)
    qmodel, _ = quantize(model, cfg, progress=False, kernel=kernel)
    x, t, y = _inputs(model)
    with torch.no_grad():
        ref = qmodel(x, t, y)
        out = use_attention(qmodel, "int8")(x, t, y)
    assert 0 < _rel(out, ref) < 5e-2


def test_selection_errors_are_one_line_ditas_errors():
    model = random_dit(depth=1)
    for bad in ("int4", "FP32", "", None):
        with pytest.raises(ConfigError) as info:
            use_attention(model, bad)
        assert "\n" not in str(info.value) and "fp32, bf16, int8" in str(info.value)
    with pytest.raises(ConfigError):
        AttentionCore("fp16")
    with pytest.raises(DitasError, match="not available for a Linear"):
        use_attention(torch.nn.Linear(2, 2), "int8")
    assert isinstance(use_attention(torch.nn.Linear(2, 2), "fp32"), torch.nn.Linear)  # the default: nothing to do
    assert all(b.attn.core is None for b in model.blocks)  # a refused call changed nothing


def test_cli_attention_option(tmp_path, tiny_weights_path, capsys):
    import numpy as np

    from ditas.cli.main import main

    outs = {}
    for mode in ("fp32", "int8"):
        out = tmp_path / f"{mode}.npz"
        assert main(["sample", "--model", str(tiny_weights_path), "--space", "pixel", "--classes", "1,2",
                     "--steps", "3", "--attention", mode, "--no-progress", "--out", str(out)]) == 0
        outs[mode] = np.load(out)["arr_0"]
    assert outs["fp32"].shape == outs["int8"].shape
    bad = tmp_path / "bad.png"
    assert main(["sample", "--model", str(tiny_weights_path), "--space", "pixel", "--attention", "int4",
                 "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ditas sample: error:") and "--attention must be one of fp32, bf16, int8" in err[-1]
    assert not bad.exists()


def test_compare_applies_attention_to_the_quantized_rows_only(tmp_path, capsys):
    import json

    import ditas
    from ditas.cli.main import main

    model_dir = tmp_path / "tiny"
    ditas.save_dit(random_dit(11, depth=2), model_dir)
    common = ["compare", "--model", str(model_dir), "--recipes", "fp,rtn", "--num", "3", "--steps", "2",
              "--calib-steps", "2", "--calib-labels", "2", "--eps-samples", "2", "--no-progress"]
    assert main(common + ["--attention", "int8", "--out", str(tmp_path / "c")]) == 0
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert data["attention"] == "int8"
    assert data["recipes"]["rtn@w4a8"]["attention"] == "int8" and "attention" not in data["recipes"]["fp"]
    capsys.readouterr()
    assert main(common + ["--attention", "fp8", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention must be one of fp32, bf16, int8" in err[0]
    assert not (tmp_path / "bad").exists()


def test_compare_recipes_refuses_an_unknown_attention_before_sampling():
    from ditas.diffusion.run import SamplingSettings
    from ditas.evaluation.comparison import compare_recipes

    with pytest.raises(ConfigError, match="attention must be one of"):
        compare_recipes(random_dit(depth=1), {"fp": None}, torch.tensor([0]), SamplingSettings(steps=2),
                        attention="int4", progress=False)
