"""The ``paper`` recipe reproduces the published DiTAS reference numerics (to float rounding: they
were recorded on another machine)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import reference_file
from quant_helpers import assert_close_to_recorded
from ditas.quantization.lora import training_free_lora
from ditas.quantization.recipes import recipe_config
from ditas.quantization.search import LayerInputs, _quant_inputs, weight_quantizer

pytestmark = pytest.mark.exactness


@pytest.fixture(scope="module")
def ref():
    return load_file(str(reference_file("ditas_reference_quantizers.safetensors")))


@pytest.mark.parametrize("shape", ["w192x64", "w96x64"])
@pytest.mark.parametrize("bits", [4, 8])
def test_paper_weight_quantizer_matches_reference(ref, shape, bits):
    q = weight_quantizer(recipe_config("paper", w_bits=bits))
    codes, deq = q(ref[f"wq.{shape}.in"])
    assert codes[0].dtype == torch.uint8
    torch.testing.assert_close(deq, ref[f"wq.{shape}.out{bits}"], rtol=0, atol=1e-6)


def test_paper_activation_quantizer_matches_reference(ref):
    """The search's quantizer (ranges from per-channel extremes) on the reference input."""
    x = ref["aq.in"].reshape(-1, ref["aq.in"].shape[-1])
    inputs = LayerInputs([x], x.amin(0, keepdim=True), x.amax(0, keepdim=True), x.abs().amax(0))
    out = _quant_inputs(inputs, 1, None, recipe_config("paper", a_bits=8))
    # recorded on another machine: equal to float rounding; one flipped code would move a value by a
    # whole quantization step (1/255 of the range, about 4e5 ulps)
    assert_close_to_recorded(out.reshape(ref["aq.out8"].shape), ref["aq.out8"], ulps=4)


def test_paper_lora_matches_reference(ref):
    with safe_open(str(reference_file("ditas_reference_quantizers.safetensors")), "pt") as f:
        meta = f.metadata()
    cfg = recipe_config("paper", w_bits=4, lora_rank=int(meta["lora_rank"]), lora_rounds=int(meta["lora_rounds"]))
    fit = training_free_lora(ref["lora.W"], weight_quantizer(cfg), cfg.lora.rank, cfg.lora.rounds, cfg.lora.keep,
                             cfg.lora.svd)
    assert fit.kept_round == cfg.lora.rounds - 1  # the reference keeps the last round
    torch.testing.assert_close(fit.dequant, ref["lora.Q"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fit.up, ref["lora.L"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fit.down, ref["lora.R"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(fit.err_per_round), ref["lora.err_per_round"], rtol=1e-5, atol=1e-6)


def test_best_round_beats_last_round_on_reference(ref):
    cfg = recipe_config("ditas", w_bits=4, lora_rank=8, lora_rounds=10)
    q = weight_quantizer(recipe_config("paper", w_bits=4))
    fit = training_free_lora(ref["lora.W"], q, 8, 10, keep="best", svd="exact")
    assert fit.error == min(fit.err_per_round)
    assert fit.kept_round != 9 and fit.error < fit.err_per_round[-1]
    # the kept codes and factors are those of the kept round: their error is the recorded one
    w = ref["lora.W"]
    err = float(torch.linalg.norm(w - fit.dequant - fit.up @ fit.down))
    assert err == pytest.approx(fit.error, rel=1e-5)
    assert cfg.lora.keep == "best"
