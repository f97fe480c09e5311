"""``ditas quantize`` / ``ditas sample`` for diffusers pipeline folders (PixArt, SD3, Flux; DiTPipeline
with class labels in place of prompts).

quantize: load the pipeline, run it on calibration prompts inside ``record_calibration`` (data
free: prompts only, latents are never decoded), quantize its transformer in place with the
recipe, write the quantized folder and ``pipeline.json`` (where the pipeline came from).
sample: rebuild the pipeline from the folder ``pipeline.json`` names (or ``--model``), put the
quantized transformer in, and write the images of ``--prompt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import DitasError


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusers pipelines (--model PIPELINE_DIR: PixArt, SD3, Flux; DiTPipeline calibrates "
                             "on --calib-labels), calibrated at the pipeline's own steps and guidance unless "
                             "--calib-steps / --calib-guidance are given")
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
    g = p.add_argument_group("diffusers pipelines (--model PIPELINE_DIR: PixArt, SD3, Flux with --prompt; "
                             "DiTPipeline with --classes)")
    g.add_argument("--quantized", help="quantized transformer folder written by 'ditas quantize --model PIPELINE_DIR' "
                                       "(a quantized DiT folder, or a diffusers DiT one that records no pipeline, "
                                       "is sampled as with --model DIR)")
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
    from ..pipelines import is_label_pipeline
    from ..validate import check_problems, finite_problem

    _check_sizes(args)
    check_problems(finite_problem(args.calib_guidance, "--calib-guidance", 0.0))
    labels = is_label_pipeline(args.model)
    given = (("--calib-sampler", args.calib_sampler),) if labels else \
        (("--calib-labels", args.calib_labels), ("--calib-sampler", args.calib_sampler))
    for flag, value in given:
        if value is not None:
            raise DitasError(f"{flag} is for class-conditional DiT models; a pipeline calibrates from "
                             f"{'labels (--calib-labels)' if labels else 'prompts (--prompts, --calib-prompts)'} "
                             "with its own scheduler")
    if labels:
        for flag, value in (("--prompts", args.prompts), ("--height", args.height), ("--width", args.width)):
            if value is not None:
                raise DitasError(f"{flag} does not apply to a DiTPipeline (class labels, its own image size): "
                                 "give --calib-labels N or --calib-labels 3,1,4")
    if args.calib_cfg is not None and args.calib_guidance is not None and args.calib_cfg != args.calib_guidance:
        raise DitasError("--calib-cfg and --calib-guidance disagree: give one (the calibration guidance scale)")
    if args.calib_prompts < 0 or args.calib_batch < 1:
        raise DitasError("--calib-prompts must be >= 0 and --calib-batch >= 1")
    steps, guidance = calibration_settings(args, cfg)
    prompts = len(calibration_conditions(args, cfg, guidance))
    check_pipeline_run(args.model, args.height, args.width, getattr(args, "device", None),
                       min(args.calib_batch, prompts), prompts * steps, what="calibration")


def calibration_settings(args: argparse.Namespace, cfg) -> tuple[int, float | None]:
    """Steps and guidance of the calibration run: the command line's, else the pipeline's own
    ``__call__`` defaults (what it is sampled with), else the recipe's steps and no guidance."""
    from ..pipelines import call_defaults

    own = call_defaults(args.model)
    steps = args.calib_steps if args.calib_steps is not None else own["num_inference_steps"] or cfg.calibration.steps
    given = args.calib_guidance if args.calib_guidance is not None else args.calib_cfg
    return steps, given if given is not None else own["guidance_scale"]


def calibration_conditions(args: argparse.Namespace, cfg, guidance: float | None) -> list:
    """The calibration prompts, or for a ``DiTPipeline`` its calibration labels (the recipe's, as
    ``ditas quantize`` picks them for a DiT: ``--calib-labels``)."""
    from ..pipelines import check_label_guidance, is_label_pipeline, read_prompts

    if not is_label_pipeline(args.model):
        prompts = read_prompts(args.prompts)
        return prompts[: args.calib_prompts] if args.calib_prompts else prompts
    n = check_label_guidance(args.model, guidance, "--calib-guidance")
    from ..errors import ConfigError

    try:
        return cfg.labels_for(n)
    except ConfigError as exc:
        raise DitasError(f"--calib-labels: {exc}") from None


def quantize(args: argparse.Namespace, cfg, claim, call_extra=None) -> int:
    """``ditas quantize --model PIPELINE_DIR``: ``cfg`` is the recipe's config with the CLI overrides;
    ``claim`` the claimed output folder (``fileio.output_dir``): everything is written into
    ``claim.tmp`` and appears at once on ``claim.publish()``. ``call_extra(pipe)``: more arguments
    of every calibration call, given the loaded pipeline (a video's ``num_frames``)."""
    from ..dtypes import cli_dtype
    from ..fileio import json_text
    from ..pipelines import PIPELINE_FILE, is_label_pipeline, load_pipeline, pipeline_ref, record_pipeline_calibration
    from ..quantization.apply import quantize as quantize_model
    from ..quantization.checkpoint import write_quantized

    steps, guidance = calibration_settings(args, cfg)
    prompts = calibration_conditions(args, cfg, guidance)
    cfg = cfg.with_flat({"steps": steps, **({} if guidance is None else {"cfg_scale": guidance})})  # as run
    t0 = time.perf_counter()
    # a DiTPipeline computes in fp32 by default, as ditas' DiT and its publishers do
    dtype = cli_dtype(getattr(args, "dtype", None), pipeline=not is_label_pipeline(args.model))
    pipe = load_pipeline(args.model, dtype=dtype)
    if getattr(args, "device", None) is not None:
        pipe = pipe.to(args.device)  # the calibration run and the block-wise search run there
    t_load = time.perf_counter() - t0
    calib = record_pipeline_calibration(pipe, prompts, steps, guidance, cfg.calibration.seed, args.height,
                                        args.width, args.calib_batch, progress=not args.no_progress,
                                        calib_cache=getattr(args, "calib_cache", None),
                                        extra=call_extra(pipe) if call_extra else None)
    _, report = quantize_model(pipe.transformer, cfg, calib, progress=not args.no_progress, inplace=True)
    report["model"] = str(args.model)
    report.setdefault("wall_time_s", {})["load_s"] = round(t_load, 3)
    report["calibration"] = {**calib.info, "transformer_calls": calib.model_calls,
                             "recorded_calls": calib.steps, "recording_s": round(calib.wall_time_s, 3)}
    write_quantized(pipe.transformer, claim.tmp, cfg)
    (claim.tmp / "report.json").write_text(json_text(report, "report.json"))
    (claim.tmp / PIPELINE_FILE).write_text(json_text(pipeline_ref(args.model, pipe), PIPELINE_FILE))
    out = claim.publish()  # weights, config, report and pipeline.json appear together
    for line in report.get("warnings", []):  # e.g. a LoRA rank capped below the float size
        print(line, file=sys.stderr)
    print(f"quantized the {type(pipe.transformer).__name__} of {args.model} with recipe {cfg.recipe} "
          f"(W{cfg.weights.bits}A{cfg.activations.bits}) from {len(prompts)} "
          f"{'labels' if 'labels' in calib.info else 'prompts'} x {steps} steps at guidance {guidance} "
          f"({calib.model_calls} transformer calls) -> {out}; mean relative layer output error "
          f"{report['mean_rel_output_error']:.4g}")
    return 0


def _sample_conditions(args: argparse.Namespace, pipeline_dir) -> list:
    """One prompt per image (``--prompt`` cycled to ``--num``), or for a ``DiTPipeline`` one class
    label per image (``--classes`` cycled, else random labels from ``--seed`` as for a DiT)."""
    from ..pipelines import check_label_guidance, is_label_pipeline

    if args.num is not None and args.num < 1:
        raise DitasError(f"--num must be at least 1, got {args.num}")
    if not is_label_pipeline(pipeline_dir):
        if getattr(args, "classes", None):
            raise DitasError("--classes is for class-conditional models (DiT, DiTPipeline); this pipeline takes --prompt")
        if not args.prompt:
            raise DitasError("give --prompt TEXT (repeat it for several images)")
        return [args.prompt[i % len(args.prompt)] for i in range(args.num or len(args.prompt))]
    if args.prompt:
        raise DitasError(f"{pipeline_dir} is a DiTPipeline (class labels): give --classes 1,2 instead of --prompt")
    import torch

    from ._args import parse_classes

    classes, k = parse_classes(getattr(args, "classes", None)), check_label_guidance(pipeline_dir, args.guidance,
                                                                                       "--guidance")
    if classes:
        bad = [c for c in classes if c >= k]
        if bad:
            raise DitasError(f"class label {bad[0]} is out of range: this model has classes 0..{k - 1}")
        return [classes[i % len(classes)] for i in range(args.num or len(classes))]
    return torch.randint(0, k, (args.num or 16,), generator=torch.Generator().manual_seed(args.seed)).tolist()


def sample(args: argparse.Namespace, device=None, world: int = 1) -> int:
    """``ditas sample --quantized DIR [--model PIPELINE_DIR] --prompt ... --out x.png`` on ``device``
    (``--device``; ``--kernel auto`` picks the quantized layers' kernels for that device)."""
    from ..dtypes import cli_dtype
    from ..fileio import check_new_file, check_not_input
    from ..pipelines import generate_images, is_label_pipeline, load_pipeline, read_pipeline_ref, save_image_grid
    from ..validate import cfg_scale_problem, check_sampling_options

    from ..image_files import folder_paths, is_folder_target, write_images

    out, per_image = Path(args.out), is_folder_target(args.out)  # DIR/: one PNG per image
    if out.suffix.lower() != ".png" and not per_image:
        raise DitasError(f"--out must end in .png or name a folder (DIR/) for a pipeline, got {out}")
    if not per_image:
        check_new_file(out, args.overwrite)
    check_not_input(out, [args.model, args.quantized])
    _check_sizes(args)
    if world > 1:
        raise DitasError("sampling a diffusers pipeline runs in one process: start it without torchrun")
    check_sampling_options(steps=args.steps, seed=args.seed)
    problem = cfg_scale_problem(args.guidance, "--guidance")
    if problem:
        raise DitasError(problem)
    pipeline_dir = args.model
    if args.quantized:
        ref = read_pipeline_ref(args.quantized)
        if pipeline_dir is None:
            if ref is None:
                raise DitasError(f"{args.quantized} does not record its pipeline: give --model PIPELINE_DIR")
            pipeline_dir = ref["pipeline"]
    if pipeline_dir is None:
        raise DitasError("give --model PIPELINE_DIR and/or --quantized DIR")
    conditions = _sample_conditions(args, pipeline_dir)
    n = len(conditions)
    paths = folder_paths(out, conditions, args.overwrite) if per_image else None
    check_pipeline_run(pipeline_dir, args.height, args.width, device, n, with_transformer=not args.quantized,
                       what=f"sampling {n} image(s) in one pipeline call")
    dtype = cli_dtype(getattr(args, "dtype", None), pipeline=not is_label_pipeline(pipeline_dir))  # DiT: fp32
    transformer = None
    if args.quantized:
        from ..quantization.checkpoint import load_quantized

        transformer = load_quantized(args.quantized, device=device, kernel=args.kernel,  # auto: for that device
                                     dtype=dtype)
    pipe = load_pipeline(pipeline_dir, transformer=transformer, dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    images = generate_images(pipe, conditions, args.steps, args.guidance, args.seed, args.height, args.width,
                             progress=not getattr(args, "no_progress", False))
    if per_image:
        write_images(images, paths)
    else:
        save_image_grid(images, out)
    print(f"wrote {len(images)} image(s) of {type(pipe.transformer).__name__} to {out}")
    return 0
