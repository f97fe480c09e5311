"""Named quantization presets: the method, its faithful reference numerics, baselines, ablations.

``recipe_config(name, **overrides)`` returns a validated ``QuantConfig``. The presets:

- ``ditas`` (default): deployable numerics (method.md section 9): TAS smoothing of all four
  layers with a per-layer alpha search, the smoothed weight quantized per output channel with
  the (max-min)/(2^b-1) range, ``proj``'s factor folded into the V rows of ``qkv`` before ``qkv``
  is quantized, rank-32 training-free LoRA keeping its best round, its factors stored in bf16
  (docs/performance.md measures the cost: -0.07 dB PSNR vs FP on the default model; half the LoRA
  bytes);
- ``paper``: the published reference code's numerics (reference32 grouping, /2^b ranges,
  quantize before smoothing, w_j from the quantized weight, loss over the first 50 steps, LoRA
  keeps the last round, exact SVD);
- ``rtn``: round-to-nearest, no smoothing, no LoRA;
- ``smoothquant``: SmoothQuant as published (alpha 0.5, channel maxima from the calibration
  run, only the layers that follow a LayerNorm: ``qkv`` and ``fc1``), no LoRA;
- ablations ``tas`` (TAS on all four layers, fixed alpha 0.5, no LoRA), ``tas_search`` (TAS with
  the search, no LoRA), ``lora`` (LoRA only, no smoothing), ``ditas_fp_adaln`` (``ditas`` with
  the adaLN linears kept in float: measures what their int8 storage costs);
- W4A4 (an extension beyond the method; docs/quantization.md measures them): ``ditas_w4a4``,
  4-bit per-token activations with every layer's input Hadamard-rotated online (``rotation.py``),
  the low-rank branch in SVDQuant's order (top-r SVD of the smoothed, rotated weight; the 4-bit
  grid takes the residual: ``absorb.py``) and GPTQ rounding of that residual from the calibration
  inputs' second moments (``gptq.py``); the ablations ``ditas_rot``, ``ditas_svdq`` and
  ``ditas_gptq`` add one of the three to ``ditas``;
- ``ditas_w4a4_a8late``: ``ditas_w4a4`` with 8-bit per-token activations at the timesteps below
  0.4 of the range (the last 20 of 50 DDPM steps; ``step_precision.py``): one set of weights,
  4-bit activations at the noisy steps only; ``ditas_nvfp4_a8late``: the same in NVFP4, without
  the rotation (``ditas_nvfp4``'s SVD-first branch and GPTQ rounding);
- ``ditas_bc``: ``ditas`` plus bias correction (each layer's bias absorbs its mean output error
  on the calibration run), an extension beyond the method;
- ``ditas_nvfp4``: ``ditas_w4a4``'s rotation, SVD-first branch and GPTQ rounding with NVFP4 weights
  and activations (W4A4 in E2M1 with FP8-E4M3 block scales per 16 input channels, ``fp4.py``;
  GPTQ keeps round-to-nearest's block scales; simulated on CPU).

Every recipe but ``paper`` and ``ditas_fp_adaln`` stores the adaLN modulation linears weight-only
in int8 after the folds (``adaln="int8"``); those two keep them in float (``paper`` as the
reference code does). The recipes with a LoRA branch store its factors in bf16, but ``paper``,
which keeps the reference code's fp32 factors (``lora_dtype="float32"`` for any recipe).

Overrides use the flat names of ``config.FLAT_NAMES`` (``w_bits=3``, ``lora_rank=0``,
``steps=100``): one word per CLI option, so ``ditas quantize`` and the API say a change the same
way, and the presets above are written in them. That table (flat name -> (spec, field)) is the
only place flat names exist; ``QuantConfig`` itself takes and exposes nested specs only. To start
from a config you already hold, use ``cfg.replace(weights=...)`` or ``cfg.with_flat({...})``.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .config import QuantConfig

RECIPES: dict[str, dict[str, Any]] = {
    "ditas": dict(lora_dtype="bfloat16"),
    "paper": dict(weight_layout="reference32", range_mode="reference", quantize_before_smooth=True,
                  w_max_from_quantized=True, fold_proj_into_v=False, loss_steps=50, lora_keep="last",
                  lora_svd="exact", search_tokens=None, adaln="float"),
    "rtn": dict(smoothing="none", search=False, lora_rank=0),
    "smoothquant": dict(smoothing="tas", smooth_roles=("qkv", "fc1"), alpha=0.5, search=False, lora_rank=0),
    "tas": dict(smoothing="tas", alpha=0.5, search=False, lora_rank=0),
    "tas_search": dict(smoothing="tas", search=True, lora_rank=0),
    "lora": dict(smoothing="none", search=False, lora_dtype="bfloat16"),
    "ditas_fp_adaln": dict(adaln="float", lora_dtype="bfloat16"),
    "ditas_bc": dict(bias_correction=True, lora_dtype="bfloat16"),
    "ditas_nvfp4": dict(w_bits=4, a_bits=4, w_format="nvfp4", a_format="nvfp4", rotation="hadamard",
                        lora_order="svd_first", w_rounding="gptq", lora_dtype="bfloat16"),
    # W4A4 (docs/quantization.md, "W4A4"): ablations of one change each, and the named winner
    "ditas_rot": dict(rotation="hadamard", lora_dtype="bfloat16"),
    "ditas_svdq": dict(lora_order="svd_first", lora_dtype="bfloat16"),
    "ditas_gptq": dict(w_rounding="gptq", lora_dtype="bfloat16"),
    "ditas_w4a4": dict(a_bits=4, act_granularity="token", rotation="hadamard", lora_order="svd_first",
                       w_rounding="gptq", lora_dtype="bfloat16"),
    "ditas_w4a4_a8late": dict(a_bits=4, act_granularity="token", rotation="hadamard", lora_order="svd_first",
                              w_rounding="gptq", lora_dtype="bfloat16", late_below=0.4, late_a_bits=8),
    # NVFP4 with late 8-bit steps: without the rotation (which costs NVFP4 class accuracy and FID)
    "ditas_nvfp4_a8late": dict(w_bits=4, a_bits=4, w_format="nvfp4", a_format="nvfp4", lora_order="svd_first",
                               w_rounding="gptq", lora_dtype="bfloat16", late_below=0.4, late_a_bits=8),
}
DEFAULT_RECIPE = "ditas"
_SPEC = re.compile(r"^([a-z][a-z0-9_]*)(?:@w(\d+)a(\d+))?(\+generic)?$")  # a recipe of --recipes, optionally @wXaY
GENERIC_SUFFIX = "+generic"  # a --recipes row quantized through the generic adapter


def recipe_config(name: str = DEFAULT_RECIPE, **overrides: Any) -> QuantConfig:
    """The preset ``name`` with ``overrides``; an explicit ``None`` is kept (``search_tokens=None``:
    every token), so callers that mean "the recipe's value" leave the key out."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r:.60}; choose one of {', '.join(RECIPES)}")
    if "recipe" in overrides:
        raise ConfigError("the recipe name is the first argument, not an override")
    return QuantConfig(recipe=name).with_flat({**RECIPES[name], **overrides})


def parse_recipes(text: str, w_bits: int | None, a_bits: int | None) -> list[tuple[str, str, int | None, int | None]]:
    """``"fp,rtn,ditas@w4a6"`` -> [(label, recipe, w_bits, a_bits), ...]: the rows of ``ditas compare``
    and ``ditas benchmark``. A recipe's bits come from its ``@wXaY``, else from ``w_bits``/``a_bits``
    (the options), else from the recipe; ``fp`` is the float model (label ``fp``, no bits). A
    ``+generic`` suffix (``ditas@w4a8+generic``) quantizes that row through the generic adapter
    (its recipe comes back as ``ditas+generic``; ``cli._args.config_from_args`` reads it)."""
    out = []
    for item in [v.strip() for v in text.split(",") if v.strip()]:
        m = _SPEC.match(item)
        if not m or (m.group(1) != "fp" and m.group(1) not in RECIPES):
            raise ConfigError(f"unknown recipe {item!r} in --recipes; choose among fp, {', '.join(RECIPES)} "
                              "(optionally with @wXaY, then +generic for the generic adapter)")
        name = m.group(1)
        if name == "fp":
            if m.group(2) or m.group(4):
                raise ConfigError(f"fp is the float model: {item!r} takes no bits and no adapter")
            out.append(("fp", "fp", None, None))
            continue
        recipe = recipe_config(name)  # bits not given anywhere: the recipe's
        w = int(m.group(2)) if m.group(2) else w_bits if w_bits is not None else recipe.weights.bits
        a = int(m.group(3)) if m.group(3) else a_bits if a_bits is not None else recipe.activations.bits
        suffix = GENERIC_SUFFIX if m.group(4) else ""
        out.append((f"{name}@w{w}a{a}{suffix}", name + suffix, w, a))
    if not out:
        raise ConfigError("--recipes is empty")
    labels = [o[0] for o in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--recipes lists a recipe twice: {text!r}")
    return out
