"""Weight-only int8 adaLN linears: accuracy against the float layer and model conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ditas.model.dit import DiT, DiTConfig
from ditas.quantization.weight_only import WeightOnlyInt8Linear, adaln_linear_names, quantize_adaln_weight_only


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("compute", ["bf16", "fp32"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (2, 96, 576), (20, 33, 17)])
def test_close_to_float_layer(compute: str, m: int, k: int, n: int) -> None:
    torch.manual_seed(m + k + n)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.bias.normal_(0, 0.02)
    q = WeightOnlyInt8Linear.from_linear(lin, compute=compute)
    x = torch.randn(m, k)
    assert q.qweight.dtype == torch.int8 and q.wscale.shape == (n, 1)
    assert int(q.qweight.abs().max()) <= 127
    y, ref = q(x), lin(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert _rel(y, ref) < 1e-2
    # the codes themselves are the round-to-nearest codes of the weight
    assert torch.equal(q.qweight, torch.round(lin.weight / q.wscale).to(torch.int8))
    if compute == "fp32":  # exact w.r.t. the int8 weight up to fp32 rounding
        assert _rel(y, nn.functional.linear(x, q.dequantized_weight(), q.bias)) < 1e-6


def test_batched_input_and_repr() -> None:
    lin = nn.Linear(16, 8, bias=False)
    q = WeightOnlyInt8Linear.from_linear(lin)
    x = torch.randn(2, 3, 16)
    assert q(x).shape == (2, 3, 8)
    assert _rel(q(x), lin(x)) < 1e-2
    assert "W8 per-channel symmetric weight-only" in repr(q) and "Abf16" in repr(q)
    with pytest.raises(ValueError, match="compute"):
        WeightOnlyInt8Linear(4, 4, compute="int4")


def test_quantize_adaln_weight_only_on_dit() -> None:
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2,
                          num_classes=4)).eval()
    for name in adaln_linear_names(model):  # adaLN-Zero initialises them to zero: give them content
        layer = model.get_submodule(name)
        nn.init.normal_(layer.weight, std=0.05)
        nn.init.normal_(layer.bias, std=0.05)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 500]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = model(x, t, y)
        names = quantize_adaln_weight_only(model)
        out = model(x, t, y)
    assert names == ["blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1", "blocks.2.adaLN_modulation.1",
                     "final_layer.adaLN_modulation.1"]
    assert all(isinstance(model.get_submodule(n), WeightOnlyInt8Linear) for n in names)
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)  # nothing else touched
    assert _rel(out, ref) < 1e-2
    assert quantize_adaln_weight_only(model) == []  # idempotent


def test_rejects_models_without_adaln() -> None:
    with pytest.raises(ValueError, match="no adaLN"):
        quantize_adaln_weight_only(nn.Sequential(nn.Linear(2, 2)))
