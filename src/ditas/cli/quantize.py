"""``ditas quantize``: data-free DiTAS quantization of a DiT into a quantized model folder."""

from __future__ import annotations

import argparse
import sys
import time

from ..devices import add_device_argument
from ..dtypes import add_dtype_argument
from ..errors import DitasError
from ..pipelines import is_pipeline_dir
from . import _text_to_image, _video
from ._args import add_quant_arguments, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..quantization.recipes import DEFAULT_RECIPE, RECIPES

    p = sub.add_parser("quantize", help="quantize a DiT or a diffusers pipeline's transformer data-free (DiTAS)",
                       description="Data-free W4A8 quantization of a DiT or of the transformer of a diffusers "
                                   "pipeline (PixArt, SD3, Flux, DiTPipeline): one FP sampling run calibrates "
                                   "every layer (TAS smoothing, alpha search, training-free LoRA, folding).")
    p.add_argument("--model", help="DiT checkpoint or folder, or a diffusers pipeline folder (default: the "
                                   "embedded default model)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE, help="quantization preset")
    add_quant_arguments(p)
    _text_to_image.add_quantize_arguments(p)
    _video.add_quantize_arguments(p)
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
    pipeline = is_pipeline_dir(args.model)  # a diffusers pipeline (PixArt, SD3, Flux, DiTPipeline)
    run_pipeline = _video if _video.is_video_run(args, args.model) else _text_to_image  # or text-to-video
    if pipeline:
        run_pipeline.check_quantize_arguments(args, cfg)
    with output_dir(args.out, "ditas-quantized", overwrite=args.overwrite,
                    inputs=[args.model, getattr(args, "prompts", None)]) as claim:
        return run_pipeline.quantize(args, cfg, claim) if pipeline else _quantize(args, cfg, claim)


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
    for line in report.get("warnings", []):  # e.g. a LoRA rank capped below the float size
        print(line, file=sys.stderr)
    late = f", A{cfg.late.a_bits} below {cfg.late.below:g} of the timesteps" if cfg.late.enabled else ""
    print(f"quantized {report['num_layers']} layers with recipe {cfg.recipe} (W{cfg.weights.bits}A{cfg.activations.bits}"
          f"{late}) -> {out}")
    print(f"  calibration: {fp['full_model_forward_passes']} full-model forward passes "
          f"(a per-layer observation would need {fp['naive_full_model_forward_passes']}); "
          f"mean relative output error {report['mean_rel_output_error']:.4g}")
    print(f"  time: run {w.get('calibration_run_s', 0):.1f}s, search {w.get('blockwise_search_s', 0):.1f}s, "
          f"convert {w.get('convert_s', 0):.1f}s, save {w['save_s']:.1f}s; peak memory {report['peak_memory_mb']:.0f} MB")
    return 0
