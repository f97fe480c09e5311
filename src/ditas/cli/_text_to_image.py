"""``ditas quantize`` / ``ditas sample`` for diffusers pipeline folders (PixArt, SD3, Flux).

quantize: load the pipeline, run it on calibration prompts inside ``record_calibration`` (data
free: prompts only, latents are never decoded), quantize its transformer in place with the
recipe, write the quantized folder and ``pipeline.json`` (where the pipeline came from).
sample: rebuild the pipeline from the folder ``pipeline.json`` names (or ``--model``), put the
quantized transformer in, and write the images of ``--prompt``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import DitasError


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusers pipelines (--model PIPELINE_DIR: PixArt, SD3, Flux)")
    g.add_argument("--prompts", help="calibration prompts, one a line (default: the 64 prompts shipped with ditas)")
    g.add_argument("--calib-prompts", type=int, default=16,
                   help="number of prompts of the list used for calibration (default 16; 0: all)")
    g.add_argument("--calib-guidance", type=float, default=None,
                   help="guidance scale of the calibration run (default: the pipeline's own; --calib-cfg "
                        "means the same here)")
    g.add_argument("--calib-batch", type=int, default=4, help="prompts per pipeline call (default 4)")
    g.add_argument("--calib-cache", metavar="DIR", default=None,
                   help="stream the recorded block calls to a new folder under DIR (removed afterwards) "
                        "instead of keeping them in memory")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusers pipelines (PixArt, SD3, Flux)")
    g.add_argument("--quantized", help="quantized transformer folder written by 'ditas quantize --model PIPELINE_DIR' "
                                       "(a quantized DiT folder is sampled as with --model DIR)")
    g.add_argument("--prompt", action="append", help="text prompt (repeat for several images)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's own)")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")


def wants_pipeline_sample(args: argparse.Namespace) -> bool:
    from ..pipelines import is_pipeline_dir

    return bool(getattr(args, "quantized", None) or getattr(args, "prompt", None) or is_pipeline_dir(args.model))


def _check_sizes(args: argparse.Namespace) -> None:
    for name in ("height", "width"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise DitasError(f"--{name} must be positive, got {v}")


def check_pipeline_run(path, height: int | None, width: int | None, device, batch: int, held: int = 0,
                       with_transformer: bool = True, what: str = "this run") -> None:
    """Before any loading: the folder has every component its pipeline lists, the image size suits
    the pipeline (VAE scale x patch size), and the activations fit ``device``'s memory: ``batch``
    images per transformer call, plus ``held`` images' worth of one block's inputs kept for
    calibration (a lower bound, so a refused run could not have finished)."""
    from ..pipelines import check_pipeline_components, image_size_problem, pipeline_geometry, tokens_of
    from ..validate import activation_bytes, check_problems, memory_problem

    geometry = pipeline_geometry(path, check_pipeline_components(path, with_transformer))
    if geometry is None:
        return  # the transformer's config does not say; diffusers reports what it lacks
    check_problems(image_size_problem(geometry, height, width), error=DitasError)
    tokens, hidden = tokens_of(geometry, height, width), geometry["width"]
    need = activation_bytes(batch, tokens, hidden) + held * tokens * hidden * 4
    how = (f"{tokens} tokens x {hidden} channels x {batch} image(s) per call"
           + (f", and one block's inputs for {held} calibration image-steps" if held else ""))
    check_problems(memory_problem(need, device, what, how), error=DitasError)


def check_quantize_arguments(args: argparse.Namespace, cfg) -> None:
    """Refuses bad pipeline options before the output is claimed and before any work."""
    from ..pipelines import read_prompts
    from ..validate import check_problems, finite_problem

    _check_sizes(args)
    check_problems(finite_problem(args.calib_guidance, "--calib-guidance", 0.0))
    for flag, value in (("--calib-labels", args.calib_labels), ("--calib-sampler", args.calib_sampler)):
        if value is not None:
            raise DitasError(f"{flag} is for class-conditional DiT models; a pipeline calibrates from prompts "
                             "(--prompts, --calib-prompts) with its own scheduler")
    if args.calib_cfg is not None and args.calib_guidance is not None and args.calib_cfg != args.calib_guidance:
        raise DitasError("--calib-cfg and --calib-guidance disagree: give one (the calibration guidance scale)")
    if args.calib_prompts < 0 or args.calib_batch < 1:
        raise DitasError("--calib-prompts must be >= 0 and --calib-batch >= 1")
    prompts = len(read_prompts(args.prompts))
    if args.calib_prompts:
        prompts = min(prompts, args.calib_prompts)
    check_pipeline_run(args.model, args.height, args.width, getattr(args, "device", None),
                       min(args.calib_batch, prompts), prompts * cfg.calibration.steps, what="calibration")


def quantize(args: argparse.Namespace, cfg, claim) -> int:
    """``ditas quantize --model PIPELINE_DIR``: ``cfg`` is the recipe's config with the CLI overrides;
    ``claim`` the claimed output folder (``fileio.output_dir``): everything is written into
    ``claim.tmp`` and appears at once on ``claim.publish()``."""
    from ..dtypes import cli_dtype
    from ..fileio import json_text
    from ..pipelines import PIPELINE_FILE, load_pipeline, pipeline_ref, read_prompts, record_pipeline_calibration
    from ..quantization.apply import quantize as quantize_model
    from ..quantization.checkpoint import write_quantized

    prompts = read_prompts(args.prompts)
    if args.calib_prompts:
        prompts = prompts[: args.calib_prompts]
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=cli_dtype(getattr(args, "dtype", None), pipeline=True))
    if getattr(args, "device", None) is not None:
        pipe = pipe.to(args.device)  # the calibration run and the block-wise search run there
    t_load = time.perf_counter() - t0
    guidance = args.calib_guidance if args.calib_guidance is not None else args.calib_cfg
    calib = record_pipeline_calibration(pipe, prompts, cfg.calibration.steps, guidance, cfg.calibration.seed, args.height,
                                        args.width, args.calib_batch, progress=not args.no_progress,
                                        calib_cache=getattr(args, "calib_cache", None))
    _, report = quantize_model(pipe.transformer, cfg, calib, progress=not args.no_progress, inplace=True)
    report["model"] = str(args.model)
    report.setdefault("wall_time_s", {})["load_s"] = round(t_load, 3)
    report["calibration"] = {**calib.info, "transformer_calls": calib.model_calls,
                             "recorded_calls": calib.steps, "recording_s": round(calib.wall_time_s, 3)}
    write_quantized(pipe.transformer, claim.tmp, cfg)
    (claim.tmp / "report.json").write_text(json_text(report, "report.json"))
    (claim.tmp / PIPELINE_FILE).write_text(json_text(pipeline_ref(args.model, pipe), PIPELINE_FILE))
    out = claim.publish()  # weights, config, report and pipeline.json appear together
    print(f"quantized the {type(pipe.transformer).__name__} of {args.model} with recipe {cfg.recipe} "
          f"(W{cfg.weights.bits}A{cfg.activations.bits}) from {len(prompts)} prompts x {cfg.calibration.steps} steps "
          f"({calib.model_calls} transformer calls) -> {out}; mean relative layer output error "
          f"{report['mean_rel_output_error']:.4g}")
    return 0


def sample(args: argparse.Namespace, device=None, world: int = 1) -> int:
    """``ditas sample --quantized DIR [--model PIPELINE_DIR] --prompt ... --out x.png`` on ``device``
    (``--device``; ``--kernel auto`` picks the quantized layers' kernels for that device)."""
    from ..dtypes import cli_dtype
    from ..fileio import check_new_file, check_not_input
    from ..pipelines import generate_images, load_pipeline, read_pipeline_ref, save_image_grid
    from ..validate import cfg_scale_problem, check_sampling_options

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise DitasError(f"--out must end in .png for a text-to-image pipeline, got {out}")
    check_new_file(out, args.overwrite)
    check_not_input(out, [args.model, args.quantized])
    _check_sizes(args)
    if world > 1:
        raise DitasError("sampling a diffusers pipeline runs in one process: start it without torchrun")
    if not args.prompt:
        raise DitasError("give --prompt TEXT (repeat it for several images)")
    check_sampling_options(steps=args.steps, seed=args.seed)
    problem = cfg_scale_problem(args.guidance, "--guidance")
    if problem:
        raise DitasError(problem)
    n = args.num or len(args.prompt)
    if n < 1:
        raise DitasError(f"--num must be at least 1, got {n}")
    pipeline_dir = args.model
    if args.quantized:
        ref = read_pipeline_ref(args.quantized)
        if pipeline_dir is None:
            if ref is None:
                raise DitasError(f"{args.quantized} does not record its pipeline: give --model PIPELINE_DIR")
            pipeline_dir = ref["pipeline"]
    if pipeline_dir is None:
        raise DitasError("give --model PIPELINE_DIR and/or --quantized DIR")
    check_pipeline_run(pipeline_dir, args.height, args.width, device, n, with_transformer=not args.quantized,
                       what=f"sampling {n} image(s) in one pipeline call")
    dtype = cli_dtype(getattr(args, "dtype", None), pipeline=True)
    transformer = None
    if args.quantized:
        from ..quantization.checkpoint import load_quantized

        transformer = load_quantized(args.quantized, device=device, kernel=args.kernel,  # auto: for that device
                                     dtype=dtype)
    pipe = load_pipeline(pipeline_dir, transformer=transformer, dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    prompts = [args.prompt[i % len(args.prompt)] for i in range(n)]
    images = generate_images(pipe, prompts, args.steps, args.guidance, args.seed, args.height, args.width,
                             progress=not getattr(args, "no_progress", False))
    save_image_grid(images, out)
    print(f"wrote {len(images)} image(s) of {type(pipe.transformer).__name__} to {out}")
    return 0
