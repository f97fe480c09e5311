"""A LoRA made with peft on a float diffusers DiT (``DiTTransformer2DModel``) applied to its
W4A8-quantized copy: peft's ``inject_adapter_in_model`` wraps the quantized layers (ditas'
``QuantLoraLinear``), the adapter changes the output as on FP, and the quantized+LoRA output is as
close to FP+LoRA as the quantized output is to FP (within 1 dB PSNR)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

import ditas  # noqa: E402
from ditas.evaluation.metrics import psnr  # noqa: E402
from ditas.lora_adapters.peft_layer import QuantLoraLinear  # noqa: E402
from quant_helpers import scale_lora_delta, tiny_diffusers_dit  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _run(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        return torch.cat([model(x, timestep=torch.full((4,), t), class_labels=y).sample for t in (950, 500, 100)])


def test_a_peft_lora_of_the_float_dit_acts_on_the_quantized_one_as_on_fp():
    fp = tiny_diffusers_dit(3)
    q = copy.deepcopy(fp)
    ditas.quantize_(q, ditas.recipe_config("ditas", steps=4, calib_labels=2, lora_rank=4, lora_rounds=2))
    ref, ref_q = _run(fp), _run(q)
    peak = float(ref.abs().max())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    lora_fp = inject_adapter_in_model(config, copy.deepcopy(fp))
    ratios = scale_lora_delta(lora_fp, 0.1)  # a trained LoRA's delta: ~10 % of the weight's norm
    assert len(ratios) == 6 * 2 and all(abs(r - 0.1) < 1e-4 for r in ratios.values())
    lora_q = inject_adapter_in_model(config, q)
    assert not set_peft_model_state_dict(lora_q, get_peft_model_state_dict(lora_fp)).unexpected_keys
    assert sum(isinstance(m, QuantLoraLinear) for m in lora_q.modules()) == 12
    out_fp, out_q = _run(lora_fp), _run(lora_q)
    quant, lora_quant = psnr(ref_q, ref, peak), psnr(out_q, out_fp, peak)
    assert lora_quant > quant - 1.0, (quant, lora_quant)
    # the LoRA visibly changes the output (float rounding alone is > 120 dB), alike on both
    assert psnr(out_fp, ref, peak) < 50 and psnr(out_q, ref_q, peak) < 50
    change_fp, change_q = (out_fp - ref).flatten(), (out_q - ref_q).flatten()
    assert torch.cosine_similarity(change_q, change_fp, dim=0) > 0.8
