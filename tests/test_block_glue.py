"""The float glue of a DiT block (modulation in place, one-temporary gated residual) is bit-identical
to the published out-of-place formulas, leaves its inputs alone, and keeps training possible."""

from __future__ import annotations

import pytest
import torch

from ditas.model.dit import gated_residual, modulate, modulate_
from quant_helpers import random_dit


def _published_block(block, x, c):
    """The published ``DiTBlock.forward``, written out (out of place)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_is_bit_identical_to_the_published_formula(dtype):
    model = random_dit(hidden=64, heads=4, depth=2).to(dtype)
    torch.manual_seed(1)
    x = torch.randn(3, 16, 64, dtype=dtype)
    c = torch.randn(3, 64, dtype=dtype)
    x0 = x.clone()
    with torch.no_grad():
        for block in model.blocks:
            out = block(x, c)
            assert torch.equal(out, _published_block(block, x, c))
            assert torch.equal(x, x0)  # the block's input is not touched
            x = x0 = out


def test_helpers_match_out_of_place_and_promote_like_it():
    torch.manual_seed(2)
    h = torch.randn(2, 5, 8)
    shift, scale, gate = (torch.randn(2, 8) for _ in range(3))
    y, x = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert torch.equal(modulate_(h.clone(), shift, scale), modulate(h, shift, scale))
    assert torch.equal(gated_residual(x, gate, y), x + gate.unsqueeze(1) * y)
    hb = h.bfloat16()  # bf16 tokens, fp32 modulation: the result is fp32, as out of place
    out = modulate_(hb.clone(), shift, scale)
    assert out.dtype == torch.float32 and torch.equal(out, modulate(hb, shift, scale))
    out = gated_residual(x.bfloat16(), gate, y.bfloat16())
    assert out.dtype == torch.float32 and torch.equal(out, x.bfloat16() + gate.unsqueeze(1) * y.bfloat16())


def test_training_still_differentiates_through_the_block():
    model = random_dit(hidden=32, heads=2, depth=1).train()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 500])
    y = torch.tensor([1, 2])
    loss = model(x, t, y).square().mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "adaLN" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
