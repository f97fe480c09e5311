"""A LoRA rank that would make a quantized layer at least as large as its float weight is capped
(with a warning in the report), and report.json states each layer's stored and float bytes."""

from __future__ import annotations

import pytest
import torch

import ditas
from ditas.quantization.layer_size import rank_cap, stored_bytes, float_bytes
from ditas.quantization.linear import QuantLinear
from quant_helpers import tiny_diffusers_dit

pytest.importorskip("diffusers")


@pytest.mark.parametrize("in_f,out_f", [(32, 32), (32, 128), (128, 32), (1152, 4608)])
@pytest.mark.parametrize("float_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_the_cap_is_the_largest_rank_below_the_float_size(in_f, out_f, float_dtype, lora_dtype):
    w = ditas.recipe_config("ditas").weights
    cap = rank_cap([(in_f, out_f, float_dtype)], w, lora_dtype, True, 10 ** 6)
    size = lambda r: stored_bytes(in_f, out_f, w, rank=r, lora_dtype=lora_dtype, smooth=True)  # noqa: E731
    assert size(cap) < float_bytes(in_f, out_f, float_dtype) <= size(cap + 1)
    assert rank_cap([(in_f, out_f, float_dtype)], w, lora_dtype, True, 2) == min(2, cap)  # never above the ask


def _quantize(rank: int, dtype=torch.float32):
    m = tiny_diffusers_dit(0).to(dtype)  # width 32: rank 16 in fp32 factors outweighs a fp32 32x32 weight
    report = ditas.quantize_(m, ditas.recipe_config("ditas", steps=2, calib_labels=2, lora_rank=rank, lora_rounds=1,
                                                    lora_dtype="float32"))
    return m, report


def test_a_rank_too_large_is_capped_with_a_warning_and_every_layer_stays_smaller(tmp_path):
    m, report = _quantize(16)
    ranks = {n: q.lora_rank for n, q in m.named_modules() if isinstance(q, QuantLinear)}
    assert ranks["transformer_blocks.0.attn1.to_q"] == 12 and ranks["transformer_blocks.0.ff.net.0.proj"] == 16
    assert any("capped to 12" in w and "attn1.to_q" in w for w in report["warnings"])
    assert all(len(w.splitlines()) == 1 for w in report["warnings"])
    assert report["layers"]["transformer_blocks.0.attn1.to_q"]["lora_rank"] == 12
    sizes = report["layer_bytes"]
    assert set(sizes) == set(ranks) and all(s["stored"] < s["float"] for s in sizes.values())
    # the stored size is what the folder holds for the layer (codes, scales, zero points, LoRA, smooth)
    from safetensors.torch import load_file

    ditas.save_quantized(m, tmp_path / "q")
    saved = load_file(str(tmp_path / "q" / "model.safetensors"))
    for name, s in sizes.items():
        held = sum(saved[f"{name}.{k}"].numel() * saved[f"{name}.{k}"].element_size()
                   for k in ("qweight", "wscale", "wzero", "smooth", "lora_down", "lora_up") if f"{name}.{k}" in saved)
        assert held == s["stored"], name


def test_bf16_models_cap_lower_and_small_ranks_are_untouched():
    _, bf16 = _quantize(16, torch.bfloat16)  # the float weight is half as large
    assert any("capped to 4" in w for w in bf16["warnings"])
    assert all(s["float"] == 2 * 32 * 32 for n, s in bf16["layer_bytes"].items() if "attn1" in n)
    m, small = _quantize(4)
    assert small["warnings"] == []
    assert all(q.lora_rank == 4 for q in m.modules() if isinstance(q, QuantLinear))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_layers_state_the_bytes_their_folder_holds(tmp_path, fmt):
    """FP4 block scales are saved as one byte each (and NVFP4 adds a float32 tensor scale): the
    report's stored size is what the folder holds for every layer."""
    from safetensors.torch import load_file

    m = tiny_diffusers_dit(0)
    report = ditas.quantize_(m, ditas.recipe_config("ditas", steps=2, calib_labels=2, lora_rank=2, lora_rounds=1,
                                                    w_format=fmt, lora_dtype="float32"))
    ditas.save_quantized(m, tmp_path / "q")
    saved = load_file(str(tmp_path / "q" / "model.safetensors"))
    for name, s in report["layer_bytes"].items():
        held = sum(saved[f"{name}.{k}"].numel() * saved[f"{name}.{k}"].element_size()
                   for k in ("qweight", "wscale", "wzero", "wtscale", "smooth", "lora_down", "lora_up")
                   if f"{name}.{k}" in saved)
        assert held == s["stored"], name
