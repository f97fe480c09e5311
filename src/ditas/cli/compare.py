"""``ditas compare``: FP against quantized recipes, sampled from the same noise and labels.

The loop and the metrics live in ``evaluation.comparison``; this module parses, prints and writes.
Per recipe: PSNR of the final uint8 samples against the FP samples, the mean squared error of the
guided epsilon prediction along the FP trajectory, and for the embedded digit model its class
accuracy, domain FID (against real digits), domain FID against the FP samples (how far the sample
distribution moved, in the same feature space), precision and recall. Writes ``compare.json`` and ``grid.png`` (one row per
recipe) into ``--out`` atomically and prints a Markdown table.

Recipes are names (``fp``, ``rtn``, ``smoothquant``, ``ditas``, ...), optionally with their own bit
widths: ``ditas@w4a6``. Recipes with the same calibration settings share one FP calibration run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..devices import add_device_argument
from ..errors import DitasError
from ..quantization.attention import check_attention_mode
from ..quantization.kernels import add_kernel_argument
from ..quantization.recipes import parse_recipes
from ._args import add_quant_arguments, config_from_args

def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="compare FP and quantized recipes on the same noise and labels")
    p.add_argument("--model", help="DiT checkpoint or folder (default: the embedded default model)")
    p.add_argument("--recipes", default="fp,rtn,smoothquant,ditas",
                   help="comma-separated recipes, each optionally @wXaY (default fp,rtn,smoothquant,ditas)")
    add_quant_arguments(p)
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=100,
                   help="number of samples (default 100); under torchrun write --num-samples (torchrun's own "
                        "parser takes --num)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the samples (default 4.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--eps-samples", type=int, default=32,
                   help="samples whose FP trajectory scores the eps-prediction MSE (default 32)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent-space models)")
    p.add_argument("--space", choices=("latent", "pixel"), default=None,
                   help="'pixel' compares a latent model's raw outputs as images (no VAE)")
    add_kernel_argument(p, "the quantized models' layers")
    p.add_argument("--attention", default="fp32", metavar="{fp32,bf16,int8}",
                   help="attention core of the quantized models (default fp32; bf16 and int8 are faster "
                        "approximations, see docs/sampling.md)")
    p.add_argument("--domain", choices=("auto", "on", "off"), default="auto",
                   help="digit-domain metrics (class accuracy, FID, precision, recall): auto = only for the "
                        "embedded default digit model")
    p.add_argument("--grid-count", type=int, default=10, help="images per row of grid.png")
    add_device_argument(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder (new; compare.json, grid.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a folder ditas wrote (never other folders, never the input model)")
    return p


def _is_default_model(path: str | None) -> bool:
    from ..model.loading import default_model_path

    if path is None:
        return True
    try:
        return Path(path).resolve() == default_model_path().resolve()
    except DitasError:
        return False


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        return f"{v:.{nd}g}" if abs(v) < 1e-2 else f"{v:.{nd}f}".rstrip("0").rstrip(".") if nd else f"{v:.0f}"
    return str(v)


def markdown_table(rows: dict[str, dict]) -> str:
    cols = [("psnr_db", "PSNR vs FP (dB)"), ("eps_mse", "eps MSE vs FP"), ("class_accuracy", "class acc."),
            ("fid", "domain FID"), ("fid_vs_fp", "domain FID vs FP samples"), ("precision", "precision"),
            ("recall", "recall")]
    present = [c for c in cols if any(r.get(c[0]) is not None for r in rows.values())]
    lines = ["| recipe | " + " | ".join(h for _, h in present) + " |",
             "| --- |" + " --- |" * len(present)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k, _ in present) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..distributed import barrier, init_from_env, leave_together, shutdown
    from ..fileio import output_dir
    from ..validate import check_sampling_options

    for name in ("num", "steps", "batch_size", "eps_samples", "grid_count"):
        if getattr(args, name) < 1:
            raise DitasError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_sampling_options(steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    specs = parse_recipes(args.recipes, args.w_bits, args.a_bits)
    check_attention_mode(args.attention, "--attention")
    configs = {label: None if recipe == "fp" else config_from_args(args, recipe, w, a)
               for label, recipe, w, a in specs}
    device = resolve_device(args.device)  # a missing device fails before the output folder is claimed
    rank, world, device = init_from_env(device)
    try:
        model = _load_checked(args, configs, device)  # sizes and memory checked before the output is claimed
        if rank != 0:  # process 0 claims and writes the output; the others sample their share
            barrier()
            return leave_together(_compare(args, specs, configs, None, device, model))
        with output_dir(args.out, "ditas-compare", overwrite=args.overwrite,
                        inputs=[args.model, getattr(args, "vae", None)]) as claim:
            barrier()
            rc = _compare(args, specs, configs, claim, device, model)
        return leave_together(rc)  # after the output is published
    finally:
        shutdown()


def _load_checked(args: argparse.Namespace, configs, device):
    """The float model, once its sizes show that the run fits: every recipe's calibration on
    ``device``, and every row's images (compare keeps them all in RAM)."""
    from ..loaders import load_dit
    from ..validate import calibration_memory_problem, check_problems, images_memory_problem

    model = load_dit(args.model, device=device)
    check_problems(images_memory_problem(model, args.num, len(configs), f"--num {args.num}"),
                   *(calibration_memory_problem(model, cfg, device) for cfg in configs.values() if cfg is not None))
    return model


def _compare(args: argparse.Namespace, specs, configs, claim, device, model) -> int:
    """The work of ``run`` once the output folder is claimed; publishes into ``claim`` (None on the
    processes other than 0 under torchrun: they only sample)."""
    from ..diffusion.images import make_grid
    from ..diffusion.run import SamplingSettings
    from ..evaluation.comparison import compare_recipes
    from ..fileio import json_text

    progress = not args.no_progress
    settings = SamplingSettings(steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    if getattr(model, "quant_config", None) is not None:
        raise DitasError("--model is a quantized model: compare starts from a float model")
    if args.space:
        model.config.space = args.space
    vae = None
    if model.config.space == "latent":
        if not args.vae:
            raise DitasError("this model works in a VAE latent space: give --vae PATH, or --space pixel to "
                             "compare raw model outputs")
        from ..model.vae import load_vae

        vae = load_vae(args.vae).to(device)
    domain = None
    if args.domain == "on" or (args.domain == "auto" and _is_default_model(args.model)):
        from ..evaluation.digits import evaluate_digit_samples as domain
    labels = torch.arange(args.num) % model.num_classes
    m_eps = min(args.eps_samples, args.num)
    t0 = time.perf_counter()

    def print_row(label: str, row: dict) -> None:
        print(f"{label}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if not isinstance(v, dict)),
              flush=True)

    rows, images = compare_recipes(model, configs, labels, settings, batch_size=args.batch_size,
                                   eps_samples=args.eps_samples, vae=vae, domain=domain, kernel=args.kernel,
                                   attention=args.attention,
                                   progress=progress, on_row=print_row)
    if claim is None:
        return 0
    out = claim.path

    k = min(args.grid_count, args.num)
    grid = make_grid(np.concatenate([images[lbl][:k] for lbl in rows]), nrow=k)
    result = {"model": args.model or "default", "attention": args.attention, "num_samples": args.num,
              "steps": args.steps,
              "cfg_scale": args.cfg_scale, "seed": args.seed, "batch_size": args.batch_size,
              "eps_samples": m_eps, "grid_rows": list(rows), "recipes": rows,
              "wall_time_s": round(time.perf_counter() - t0, 1)}
    from PIL import Image

    (claim.tmp / "compare.json").write_text(json_text(result, "compare.json"))
    Image.fromarray(grid).save(claim.tmp / "grid.png", format="PNG")
    claim.publish()
    print(markdown_table(rows))
    print(f"wrote {out}/compare.json and {out}/grid.png")
    return 0
