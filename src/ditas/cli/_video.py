"""``ditas quantize`` / ``ditas sample`` for diffusers text-to-video pipeline folders (Wan,
CogVideoX, LTX, HunyuanVideo, Mochi, ...; ``ditas.video`` says which folders are).

quantize: as for a text-to-image pipeline (``_text_to_image.quantize``: the user's prompts run
through the pipeline inside ``record_calibration``, latents only), each call making a clip of
``--frames`` frames. sample: one clip of ``--prompt`` written as .mp4, .gif or a folder of PNG
frames; every refusal (output kind, missing imageio, frame count, an existing output) comes
before the pipeline is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import DitasError
from . import _text_to_image

_FRAMES_HELP = ("frames of each clip: 1 + k x the VAE's temporal compression (default 1 + 4 x it: 17 for Wan "
                "and CogVideoX)")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video pipelines (--model PIPELINE_DIR: Wan, CogVideoX, LTX, HunyuanVideo, Mochi, ...; "
                             "prompts, steps and sizes as for the pipelines above)")
    g.add_argument("--frames", type=int, default=None, help=_FRAMES_HELP + " of the calibration run")


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video pipelines (--out clip.mp4 | clip.gif | frames/)")
    g.add_argument("--frames", type=int, default=None, help=_FRAMES_HELP)
    g.add_argument("--fps", type=float, default=None,
                   help="frames per second of the written clip (default: the model's; Wan 16, CogVideoX 8)")


def is_video_run(args: argparse.Namespace, pipeline_dir) -> bool:
    """Whether this run is on a video pipeline; elsewhere the video options are refused."""
    from ..video import is_video_pipeline

    if is_video_pipeline(pipeline_dir):
        return True
    if pipeline_dir is None and getattr(args, "quantized", None):  # --quantized names no pipeline: the
        out = str(getattr(args, "out", ""))  # path of its output kind says so
        return out.lower().endswith((".mp4", ".gif", "/"))
    given = [f for f, v in (("--frames", getattr(args, "frames", None)), ("--fps", getattr(args, "fps", None)))
             if v is not None]
    if given:
        raise DitasError(f"{' and '.join(given)}: for video pipelines; {pipeline_dir or 'this model'} is not one")
    return False


def pipeline_dir_of(args: argparse.Namespace, strict: bool = True):
    """The pipeline folder of a sample run: ``--model``, else the one ``--quantized`` records (None
    where it records none, or an unreadable one: ``strict`` refuses that in one line)."""
    from ..pipelines import read_pipeline_ref

    if args.model is not None or not getattr(args, "quantized", None):
        return args.model
    try:
        ref = read_pipeline_ref(args.quantized)
    except DitasError:
        if strict:
            raise
        ref = None
    if ref is None and strict:
        raise DitasError(f"{args.quantized} does not record its pipeline: give --model PIPELINE_DIR")
    return ref["pipeline"] if ref else None


def check_quantize_arguments(args: argparse.Namespace, cfg) -> None:
    """The text-to-image checks, a text-to-video pipeline, and a frame count it makes (where its
    VAE config says its temporal compression; otherwise checked once it is loaded)."""
    from ..video import check_text_to_video, config_temporal_factor, frames_problem

    check_text_to_video(args.model)
    problem = frames_problem(args.frames, config_temporal_factor(args.model), f"the pipeline in {args.model}")
    if problem:
        raise DitasError(problem)
    _text_to_image.check_quantize_arguments(args, cfg)
    second = second_transformer(args.model)
    if second:
        print(f"note: {args.model} has a second transformer ({second}, e.g. Wan 2.2's "
              "low-noise expert); ditas quantizes 'transformer' only, the other stays in float", file=sys.stderr)


def second_transformer(path) -> str | None:
    """The name of a pipeline's second transformer component, if it has one (Wan 2.2 A14B)."""
    from ..pipelines import check_pipeline_components

    index = check_pipeline_components(path)
    return next((k for k, v in index.items() if k.startswith("transformer_") and isinstance(v, list)
                 and v != [None, None]), None)


def quantize(args: argparse.Namespace, cfg, claim) -> int:
    """``ditas quantize --model VIDEO_PIPELINE_DIR``: ``_text_to_image.quantize`` with clips of
    ``--frames`` frames."""
    from ..video import frames_for

    return _text_to_image.quantize(args, cfg, claim, call_extra=lambda pipe: {"num_frames": frames_for(pipe, args.frames)})


def _check_sample_arguments(args: argparse.Namespace, world: int) -> str:
    """Every refusal that needs nothing loaded; returns the output kind."""
    from ..validate import cfg_scale_problem, check_problems, check_sampling_options
    from ..video import check_fps, check_output, frames_problem

    kind = check_output(args.out, args.overwrite, [args.model, args.quantized])
    if world > 1:
        raise DitasError("sampling a video pipeline runs in one process: start it without torchrun")
    if not args.prompt or len(args.prompt) > 1 or (args.num or 1) != 1:
        raise DitasError("a video sample makes one clip: give one --prompt TEXT (and no --num)")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DitasError(f"--{name} must be positive, got {getattr(args, name)}")
    check_sampling_options(steps=args.steps, seed=args.seed)
    check_problems(cfg_scale_problem(args.guidance, "--guidance"), frames_problem(args.frames), error=DitasError)
    check_fps(args.fps)
    return kind


def sample(args: argparse.Namespace, device=None, world: int = 1) -> int:
    """``ditas sample [--quantized DIR] [--model PIPELINE_DIR] --prompt ... --frames N --out clip.mp4``."""
    from ..dtypes import cli_dtype
    from ..pipelines import check_pipeline_components, generate_video, load_pipeline
    from ..video import check_text_to_video, config_temporal_factor, default_fps, frames_for, frames_problem
    from ..video import write_video

    _check_sample_arguments(args, world)
    pipeline_dir = pipeline_dir_of(args)
    check_text_to_video(pipeline_dir)
    check_pipeline_components(pipeline_dir, with_transformer=not args.quantized)
    problem = frames_problem(args.frames, config_temporal_factor(pipeline_dir), f"the pipeline in {pipeline_dir}")
    if problem:
        raise DitasError(problem)
    dtype = cli_dtype(getattr(args, "dtype", None), pipeline=True)
    transformer = None
    if args.quantized:
        from ..quantization.checkpoint import load_quantized

        transformer = load_quantized(args.quantized, device=device, kernel=args.kernel, dtype=dtype)
    pipe = load_pipeline(pipeline_dir, transformer=transformer, dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    frames = frames_for(pipe, args.frames)
    clip = generate_video(pipe, args.prompt[0], frames, args.steps, args.guidance, args.seed, args.height,
                          args.width, progress=not getattr(args, "no_progress", False))
    fps = args.fps or default_fps(pipe)
    out = write_video(clip, args.out, fps, args.overwrite, inputs=[args.model, args.quantized],
                      info={"prompt": args.prompt[0], "seed": args.seed, "steps": args.steps,
                            "pipeline": str(Path(pipeline_dir).resolve()), "quantized": args.quantized})
    print(f"wrote {len(clip)} frames ({clip.shape[2]}x{clip.shape[1]}, {fps:g} fps) of "
          f"{type(pipe.transformer).__name__} to {out}")
    return 0
