"""``ditas quantize``: data-free DiTAS quantization of a DiT into a quantized model folder."""

from __future__ import annotations

import argparse
import time

from ..devices import add_device_argument
from ..dtypes import add_dtype_argument
from ..errors import ConfigError, DitasError
from ..pipelines import is_pipeline_dir
from . import _text_to_image


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


def add_quant_arguments(p: argparse.ArgumentParser, with_bits: bool = True) -> None:
    """Options shared by ``quantize`` and ``compare``. Every default is None, meaning the recipe's
    value (the help shows the default recipe's)."""
    from ..quantization.config import (ACT_GRANULARITIES, ADALN_MODES, LORA_STORAGE, SAMPLERS, SEARCH_WEIGHTS,
                                       WEIGHT_LAYOUTS)
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
    p.add_argument("--act-granularity", choices=ACT_GRANULARITIES, default=None,
                   help=f"dynamic activation scales per tensor (reference) or per token ({r} {d.activations.granularity})")
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
    p.add_argument("--search-tokens", type=int, default=None,
                   help=f"tokens per step in the search loss; 0: all ({r} {d.smooth.search_tokens})")


def config_from_args(args: argparse.Namespace, recipe: str, w_bits: int | None = None, a_bits: int | None = None):
    """The recipe with the options the user gave (an option left out keeps the recipe's value)."""
    from ..api import recipe_config

    given = dict(
        w_bits=w_bits if w_bits is not None else getattr(args, "w_bits", None),
        a_bits=a_bits if a_bits is not None else getattr(args, "a_bits", None),
        weight_layout=args.weight_layout, group_size=args.group_size, act_granularity=args.act_granularity,
        calib_labels=parse_labels(args.calib_labels), steps=args.calib_steps, cfg_scale=args.calib_cfg,
        seed=args.calib_seed, sampler=args.calib_sampler, lora_rank=args.lora_rank, lora_rounds=args.lora_rounds,
        lora_dtype=getattr(args, "lora_dtype", None),
        alpha=args.alpha, search_weight=args.search_weight, adaln=args.adaln,
        search_shortlist=args.search_shortlist, search_workers=args.search_workers,
        bias_correction=args.bias_correction)
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.search_tokens is not None:
        if args.search_tokens < 0:
            raise ConfigError(f"--search-tokens must be >= 0, got {args.search_tokens}")
        overrides["search_tokens"] = args.search_tokens or None
    return recipe_config(recipe, **overrides)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..quantization.recipes import DEFAULT_RECIPE, RECIPES

    p = sub.add_parser("quantize", help="quantize a DiT data-free (DiTAS) into a model folder",
                       description="Data-free W4A8 quantization: one FP sampling run calibrates every layer "
                                   "(TAS smoothing, alpha search, training-free LoRA, folding).")
    p.add_argument("--model", help="DiT checkpoint or folder (default: the embedded default model)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE, help="quantization preset")
    add_quant_arguments(p)
    _text_to_image.add_quantize_arguments(p)
    add_device_argument(p)
    add_dtype_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output model folder (new; written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a folder ditas wrote (never other folders, never the input model)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..fileio import output_dir

    cfg = config_from_args(args, args.recipe)
    args.device = resolve_device(args.device)  # a missing device fails before the output folder is claimed
    pipeline = is_pipeline_dir(args.model)  # a diffusers text-to-image pipeline (PixArt, SD3, Flux)
    if pipeline:
        _text_to_image.check_quantize_arguments(args, cfg)
    with output_dir(args.out, "ditas-quantized", overwrite=args.overwrite,
                    inputs=[args.model, getattr(args, "prompts", None)]) as claim:
        return _text_to_image.quantize(args, cfg, claim) if pipeline else _quantize(args, cfg, claim)


def _quantize(args: argparse.Namespace, cfg, claim) -> int:
    """The work of ``run`` once the output folder is claimed; publishes into ``claim``."""
    from .. import api
    from ..dtypes import cli_dtype
    from ..loaders import load_dit  # the api layer's loader of any model or folder
    from ..fileio import json_text

    out = claim.path
    t0 = time.perf_counter()
    model = load_dit(args.model, device=args.device, dtype=cli_dtype(args.dtype, pipeline=False))
    if getattr(model, "quant_config", None) is not None:
        raise DitasError(f"{args.model} is a quantized model already: quantize a float model")
    t_load = time.perf_counter() - t0
    report = api.quantize_(model, cfg, progress=not args.no_progress)  # refuses a calibration run too large first
    t1 = time.perf_counter()
    report["model"] = str(args.model) if args.model else "default"
    report["wall_time_s"]["load_s"] = round(t_load, 3)
    api.write_quantized(model, claim.tmp)
    report["wall_time_s"]["save_s"] = round(time.perf_counter() - t1, 3)
    (claim.tmp / "report.json").write_text(json_text(report, "report.json"))
    claim.publish()  # weights, config and report appear together, in one step
    w = report["wall_time_s"]
    fp = report["forward_passes"]
    print(f"quantized {report['num_layers']} layers with recipe {cfg.recipe} (W{cfg.weights.bits}A{cfg.activations.bits}) -> {out}")
    print(f"  calibration: {fp['full_model_forward_passes']} full-model forward passes "
          f"(a per-layer observation would need {fp['naive_full_model_forward_passes']}); "
          f"mean relative output error {report['mean_rel_output_error']:.4g}")
    print(f"  time: run {w.get('calibration_run_s', 0):.1f}s, search {w.get('blockwise_search_s', 0):.1f}s, "
          f"convert {w.get('convert_s', 0):.1f}s, save {w['save_s']:.1f}s; peak memory {report['peak_memory_mb']:.0f} MB")
    return 0
