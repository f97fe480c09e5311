"""Folding the smoothing factors never changes the function (up to float rounding)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ditas.quantization.apply import calibrate, convert, record
from ditas.quantization.config import ActivationFormat, WeightFormat
from ditas.quantization.linear import QuantLinear
from ditas.quantization.recipes import recipe_config
from ditas.quantization.smoothing import OnTheFlySmooth
from quant_helpers import fold_into_adaln, fold_into_v_rows, random_dit


def _inputs(m, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = m.config
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, c.num_classes, (n,), generator=g)
    return x, t, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folded_model_equals_unfolded_smoothed_model(seed):
    m = random_dit(seed, depth=2)
    g = torch.Generator().manual_seed(100 + seed)
    factors = {(i, r): torch.rand(m.blocks[i].mlp.fc2.in_features if r == "fc2" else m.config.hidden_size,
                                  generator=g) * 4 + 0.05
               for i in range(len(m.blocks)) for r in ("qkv", "proj", "fc1", "fc2")}
    unfolded, folded = copy.deepcopy(m), copy.deepcopy(m)
    for i, b in enumerate(unfolded.blocks):  # X / s on the fly, W * s
        b.attn.qkv = OnTheFlySmooth(b.attn.qkv, factors[i, "qkv"])
        b.attn.proj = OnTheFlySmooth(b.attn.proj, factors[i, "proj"])
        b.mlp.fc1 = OnTheFlySmooth(b.mlp.fc1, factors[i, "fc1"])
        b.mlp.fc2 = OnTheFlySmooth(b.mlp.fc2, factors[i, "fc2"])
    with torch.no_grad():
        for i, b in enumerate(folded.blocks):
            fold_into_adaln(b, "qkv", factors[i, "qkv"])
            fold_into_adaln(b, "fc1", factors[i, "fc1"])
            fold_into_v_rows(b.attn.qkv, factors[i, "proj"])
            for lin, r in ((b.attn.qkv, "qkv"), (b.attn.proj, "proj"), (b.mlp.fc1, "fc1")):
                lin.weight.mul_(factors[i, r][None, :])
            b.mlp.fc2 = OnTheFlySmooth(b.mlp.fc2, factors[i, "fc2"])  # nothing linear precedes fc2
    x, t, y = _inputs(m, seed=seed)
    with torch.no_grad():
        ref, a, f = m(x, t, y), unfolded(x, t, y), folded(x, t, y)
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f, a, rtol=1e-4, atol=1e-5)
    assert not torch.equal(m.blocks[0].adaLN_modulation[1].weight, folded.blocks[0].adaLN_modulation[1].weight)


def test_v_row_fold_of_quantlinear_is_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 48)
    down, up = torch.randn(4, 16) * 0.1, torch.randn(48, 4) * 0.1
    q = QuantLinear.from_linear(lin, WeightFormat(4), ActivationFormat(16), lora_down=down, lora_up=up)
    s = torch.rand(16) + 0.5
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = q(x)
        fold_into_v_rows(q, s)
        after = q(x)
    torch.testing.assert_close(after[:, 32:], before[:, 32:] / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[:, :32], before[:, :32])
    ref32 = QuantLinear.from_linear(torch.nn.Linear(16, 96), WeightFormat(4, "reference32"), ActivationFormat(8))
    with pytest.raises(TypeError, match="layout"):
        fold_into_v_rows(ref32, torch.ones(32))


@pytest.mark.parametrize("recipe", ["ditas", "paper"])
def test_convert_folds_without_changing_the_quantized_function(recipe):
    """With float activations (A16) the converted, folded model equals a model with the same
    quantized weights and every factor applied on the fly (adaLN kept float: folding is exact,
    its int8 storage is not)."""
    m = random_dit(5, depth=2)
    cfg = recipe_config(recipe, a_bits=16, steps=3, calib_labels=2, lora_rank=4, lora_rounds=2,
                        alpha_grid=(0.3, 0.7), adaln="float")
    cal = calibrate(m, cfg, record(m, cfg, progress=False), progress=False)
    folded = convert(copy.deepcopy(m), cal)
    onfly = copy.deepcopy(m)
    for name, r in cal.layers.items():
        lin = onfly.get_submodule(name)
        q = QuantLinear.from_linear(lin, cfg.weights, dataclasses.replace(cfg.activations, bits=16), smooth=r.smooth, lora_down=r.lora_down,
                                    lora_up=r.lora_up, codes=r.codes)
        q.bias.copy_(r.bias)
        if r.role == "proj" and r.smooth is not None and cfg.smooth.fold_proj_into_v:
            # qkv's V rows carry 1/s already; undo it on the fly here by not dividing the input
            q.smooth = None
        parent, _, child = name.rpartition(".")
        setattr(onfly.get_submodule(parent), child, q)
    kinds = {type(folded.get_submodule(n)).__name__ for n in cal.layers}
    assert kinds == {"QuantLinear"}
    assert folded.blocks[0].attn.qkv.smooth is None and folded.blocks[0].mlp.fc1.smooth is None
    assert folded.blocks[0].mlp.fc2.smooth is not None
    x, t, y = _inputs(m, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, t, y), onfly(x, t, y), rtol=1e-4, atol=1e-5)
