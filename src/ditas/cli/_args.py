"""Argument helpers shared by several commands (``quantize``, ``compare``, ``benchmark``): the
quantization options and the ``QuantConfig`` they give. Argparse only: no command's work lives here,
so the command modules never import one another (``tests/test_model_seam.py`` checks)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def parse_labels(text: str | None) -> int | tuple[int, ...] | None:
    """``"16"`` -> 16 labels; ``"3,1,4"`` -> those labels."""
    if text is None:
        return None
    try:
        if "," in text:
            return tuple(int(v) for v in text.split(",") if v.strip())
        return int(text)
    except ValueError:
        raise ConfigError(f"--calib-labels must be a count or comma-separated labels, got {text!r}") from None


def parse_classes(text: str | None) -> list[int] | None:
    """``--classes 1,2``: the labels of ``ditas sample`` (a DiT or a DiTPipeline), checked."""
    from ..validate import labels_problem

    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError("--classes is empty")
    problem = labels_problem(values)  # 10**23 overflows the int64 label tensor
    if problem:
        raise ConfigError(problem)
    return values


def add_quant_arguments(p: argparse.ArgumentParser, with_bits: bool = True) -> None:
    """Options shared by ``quantize`` and ``compare``. Every default is None, meaning the recipe's
    value (the help shows the default recipe's)."""
    from ..quantization.config import (ACT_GRANULARITIES, ADALN_MODES, FORMATS, GPTQ_ORDERS, LORA_ORDERS,
                                       LORA_STORAGE, ROTATIONS, SAMPLERS, SEARCH_WEIGHTS, WEIGHT_LAYOUTS,
                                       WEIGHT_ROUNDINGS)
    from ..quantization.recipes import DEFAULT_RECIPE, recipe_config

    d = recipe_config(DEFAULT_RECIPE)
    r = f"the recipe's; {DEFAULT_RECIPE}:"
    if with_bits:
        p.add_argument("--w-bits", type=int, default=None, help=f"weight bits, 2..8 ({r} {d.weights.bits})")
        p.add_argument("--a-bits", type=int, default=None,
                       help=f"activation bits, 4..16; 16 = float ({r} {d.activations.bits})")
    p.add_argument("--weight-layout", choices=WEIGHT_LAYOUTS, default=None,
                   help=f"weight scale layout ({r} {d.weights.layout})")
    p.add_argument("--group-size", type=int, default=None, help="group size for --weight-layout group")
    p.add_argument("--w-format", choices=FORMATS, default=None,
                   help=f"weight number format: int, or FP4 (E2M1) with block scales: nvfp4 (blocks of 16, FP8-E4M3 "
                        f"scales and a tensor scale), mxfp4 (blocks of 32, power-of-two scales); FP4 needs --w-bits 4 "
                        f"({r} {d.weights.format})")
    p.add_argument("--a-format", choices=FORMATS, default=None,
                   help=f"activation number format, as --w-format; FP4 needs --a-bits 4 ({r} {d.activations.format})")
    p.add_argument("--act-granularity", choices=ACT_GRANULARITIES, default=None,
                   help="dynamic INT activation scales per tensor (the reference's), per token, or per group of "
                        "--act-group-size input channels (default: per token below 8 bits, else per tensor; "
                        "group-wise runs on the simulated kernel)")
    p.add_argument("--act-group-size", type=int, default=None,
                   help="input channels per scale of --act-granularity group (default 64)")
    p.add_argument("--calib-labels", default=None,
                   help=f"number of calibration labels, or comma-separated labels ({r} {d.calibration.labels})")
    p.add_argument("--calib-steps", type=int, default=None,
                   help=f"calibration sampling steps; use the inference step count ({r} {d.calibration.steps})")
    p.add_argument("--calib-cfg", type=float, default=None, help=f"calibration guidance scale ({r} {d.calibration.cfg_scale})")
    p.add_argument("--calib-seed", type=int, default=None, help=f"calibration seed ({r} {d.calibration.seed})")
    p.add_argument("--calib-sampler", choices=SAMPLERS, default=None, help=f"({r} {d.calibration.sampler})")
    p.add_argument("--lora-rank", type=int, default=None, help=f"LoRA rank ({r} {d.lora.rank})")
    p.add_argument("--lora-rounds", type=int, default=None, help=f"training-free LoRA rounds ({r} {d.lora.rounds})")
    p.add_argument("--lora-dtype", choices=LORA_STORAGE, default=None,
                   help=f"storage of the LoRA factors: bfloat16 halves them (DiT-XL/2 checkpoint 18.5 %% of fp32 "
                        f"instead of 19.7 %%; measured -0.07 dB PSNR on the default model), float32 keeps them as "
                        f"fitted ({r} {d.lora.dtype})")
    p.add_argument("--alpha", type=float, default=None, help="fixed smoothing alpha (recipes without search)")
    p.add_argument("--search-weight", choices=SEARCH_WEIGHTS, default=None,
                   help="weight scored by the alpha search (default auto = exact: every LoRA round at every "
                        "alpha; see docs/quantization.md)")
    p.add_argument("--search-shortlist", type=int, default=None,
                   help=f"alphas rescored with every LoRA round by the shortlist search ({r} {d.smooth.search_shortlist})")
    p.add_argument("--search-workers", type=int, default=None,
                   help="threads scoring alphas in parallel (default: torch's thread count; same result)")
    p.add_argument("--bias-correction", action="store_true", default=None,
                   help="fold each layer's mean output error on the calibration run into its bias "
                        "(an extension beyond the method; see docs/quantization.md)")
    p.add_argument("--adaln", choices=ADALN_MODES, default=None,
                   help="adaLN modulation linears: int8 weight-only (default for all recipes but paper and "
                        "ditas_fp_adaln) "
                        "or float")
    p.add_argument("--adapter", choices=("auto", "generic"), default=None,
                   help="who describes the model: auto (its hand-written adapter, the generic one where none "
                        "exists) or generic (the generic adapter always, e.g. to compare; see docs/families.md)")
    p.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                   help="leave the linears whose qualified names match PATTERN (fnmatch, e.g. '*.ff.*') in "
                        "float; repeatable; listed in report.json")
    p.add_argument("--rotation", choices=ROTATIONS, default=None,
                   help=f"Hadamard rotation of the layers' inputs, online (none, hadamard, or search: the per-layer "
                        f"search chooses) ({r} {d.smooth.rotation})")
    p.add_argument("--lora-order", choices=LORA_ORDERS, default=None,
                   help=f"low-rank branch: quantize_first (ditas: fit to the weight error), svd_first (SVDQuant: "
                        f"top-r SVD of the smoothed weight, quantize the residual), or search ({r} {d.lora.order})")
    p.add_argument("--w-rounding", choices=WEIGHT_ROUNDINGS, default=None,
                   help=f"weight rounding: nearest, gptq (error-compensated from the calibration inputs' second "
                        f"moments), or search ({r} {d.weights.rounding})")
    p.add_argument("--gptq-order", choices=GPTQ_ORDERS, default=None,
                   help=f"GPTQ column order: natural or desc (descending second moment) ({r} {d.weights.gptq_order})")
    p.add_argument("--late-below", type=float, default=None, metavar="FRACTION",
                   help=f"step-dependent activations: at the timesteps below this fraction of the range, activations "
                        f"in --late-a-bits (0: off) ({r} {d.late.below})")
    p.add_argument("--late-a-bits", type=int, default=None,
                   help=f"activation bits (per token) at the late steps of --late-below ({r} {d.late.a_bits})")
    p.add_argument("--search-tokens", type=int, default=None,
                   help=f"tokens per step in the search loss; 0: all ({r} {d.smooth.search_tokens})")


def config_from_args(args: argparse.Namespace, recipe: str, w_bits: int | None = None, a_bits: int | None = None):
    """The recipe with the options the user gave (an option left out keeps the recipe's value)."""
    from ..quantization.recipes import GENERIC_SUFFIX, recipe_config

    if recipe.endswith(GENERIC_SUFFIX):  # a --recipes row quantized through the generic adapter
        recipe = recipe[: -len(GENERIC_SUFFIX)]
        args = argparse.Namespace(**{**vars(args), "adapter": "generic"})
    given = dict(
        w_bits=w_bits if w_bits is not None else getattr(args, "w_bits", None),
        a_bits=a_bits if a_bits is not None else getattr(args, "a_bits", None),
        weight_layout=args.weight_layout, group_size=args.group_size, act_granularity=args.act_granularity,
        w_format=args.w_format, a_format=args.a_format, act_group_size=args.act_group_size,
        calib_labels=parse_labels(args.calib_labels), steps=args.calib_steps, cfg_scale=args.calib_cfg,
        seed=args.calib_seed, sampler=args.calib_sampler, lora_rank=args.lora_rank, lora_rounds=args.lora_rounds,
        lora_dtype=getattr(args, "lora_dtype", None),
        alpha=args.alpha, search_weight=args.search_weight, adaln=args.adaln,
        search_shortlist=args.search_shortlist, search_workers=args.search_workers,
        bias_correction=args.bias_correction, adapter=getattr(args, "adapter", None),
        skip=tuple(args.skip) if getattr(args, "skip", None) else None, rotation=getattr(args, "rotation", None),
        lora_order=getattr(args, "lora_order", None), w_rounding=getattr(args, "w_rounding", None),
        gptq_order=getattr(args, "gptq_order", None), late_below=getattr(args, "late_below", None),
        late_a_bits=getattr(args, "late_a_bits", None))
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.search_tokens is not None:
        if args.search_tokens < 0:
            raise ConfigError(f"--search-tokens must be >= 0, got {args.search_tokens}")
        overrides["search_tokens"] = args.search_tokens or None
    return recipe_config(recipe, **overrides)
