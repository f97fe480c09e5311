"""``ditas sample``: images from a DiT (float or quantized), as a PNG grid or an ADM-style npz.

Sampling is ``ditas.sample`` (``api.py``); an npz goes through ``diffusion.sharded.sample_npz``: sharded, resumable, memory bounded by the
batch, and split over processes under ``torchrun --nproc_per_node N -m ditas sample ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..devices import add_device_argument
from ..dtypes import add_dtype_argument
from ..diffusion.sharded import DEFAULT_SHARD_SIZE
from ..errors import DitasError
from ..image_files import folder_paths, is_folder_target, write_images
from ..quantization.kernels import add_kernel_argument
from . import _text_to_image, _video
from ._args import parse_classes as _parse_classes


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("sample", help="sample images from a DiT or a diffusers pipeline",
                       description="Sample images from a DiT (class labels) or a diffusers pipeline (PixArt, SD3, "
                                   "Flux with --prompt; DiTPipeline with --classes). Without --model: the embedded default "
                                   "model (a small DiT trained on real digits). Sample i's noise depends only on "
                                   "(--seed, i): the same seed gives the same images whatever --batch-size, the "
                                   "number of torchrun processes and (up to float rounding) the device (a quantized model with "
                                   "per-tensor activation scales shares one scale per batch: keep --batch-size to "
                                   "get the same images). For many "
                                   "images: torchrun --nproc_per_node N -m ditas sample ... --out X.npz; a killed "
                                   "run started again with the same arguments resumes from its shards.")
    p.add_argument("--model", help="checkpoint (.pt/.safetensors) or model folder (ditas, quantized, diffusers)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent-space models)")
    p.add_argument("--classes", help="comma-separated labels, cycled over the images (DiT, DiTPipeline; default: random)")
    p.add_argument("--num", "--num-samples", dest="num", type=int,
                   help="number of images (default: one per --classes entry, else 16); under torchrun write "
                        "--num-samples (torchrun's own parser takes --num for its --numa-binding)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (respaced from 1000; default 50)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (<=1: none)")
    p.add_argument("--guide-all-channels", action="store_true",
                   help="guide every output channel (the reference guides only the first 3)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i's noise comes from (seed, i) only (default 0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per model call (default 64); does not change the images")
    p.add_argument("--shard-dir", help="npz output: folder of finished shards, kept until the npz is written "
                                       "(default OUT.shards beside --out); a run started again resumes from it")
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"npz output: images per shard (default {DEFAULT_SHARD_SIZE}, or fewer so that every "
                        "process gets one)")
    add_device_argument(p)
    p.add_argument("--space", choices=("latent", "pixel"), default=None,
                   help="override the model's space; 'pixel' writes a latent model's raw output as images "
                        "(inspection without a VAE)")
    add_kernel_argument(p, "a quantized model's layers")
    p.add_argument("--attention", default=None, metavar="{fp32,bf16,int8}",
                   help="attention core of a ditas DiT (default fp32: scaled_dot_product_attention as the model "
                        "was built; bf16 and int8 are faster approximations, see docs/sampling.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output .png (grid), .npz (arr_0 uint8 NHWC + labels; DiT only) "
                                                "or a folder DIR/ (one PNG per image, named by index and label or "
                                                "prompt); new files. A video pipeline: .mp4, .gif or a folder "
                                                "frames/")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _text_to_image.add_sample_arguments(p)
    _video.add_sample_arguments(p)
    add_dtype_argument(p)
    return p


MAX_GRID_IMAGES = 1024  # a PNG grid is for looking at; more images go to an .npz


def check_output_size(out: Path, n: int, config) -> None:
    """Refuses a PNG grid of more than MAX_GRID_IMAGES images, and an .npz larger than the free disk."""
    import shutil

    if out.suffix.lower() == ".png":
        if n > MAX_GRID_IMAGES:
            raise DitasError(f"--num {n}: a PNG grid holds at most {MAX_GRID_IMAGES} images; write an .npz for more")
        return
    side = config.input_size * (8 if config.space == "latent" else 1)  # the SD VAE upsamples 8x
    need = n * side * side * 3 + n * 8 + (1 << 20)  # uint8 RGB images, int64 labels, zip headers
    free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    if need > free:
        raise DitasError(f"--num {n}: the .npz would take {need / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB "
                         f"are free in {out.parent}")


def _quantized_dit_as_model(args: argparse.Namespace) -> None:
    """``--quantized DIR`` naming a quantized class-conditional DiT folder samples it as ``--model DIR``
    does (``--quantized`` is otherwise the transformer of a text-to-image pipeline)."""
    from ..quantization.checkpoint import read_config

    if not getattr(args, "quantized", None) or getattr(args, "prompt", None):
        return
    try:
        family = read_config(args.quantized).get("family", "dit")
    except DitasError:
        return  # not a quantized folder: the pipeline path says what is wrong
    if family == "diffusers-dit":  # a diffusers DiT: its DiTPipeline when it records one, else as --model
        from ..pipelines import read_pipeline_ref

        if args.model or read_pipeline_ref(args.quantized) is not None:
            return
    elif family != "dit":
        return
    if args.model:
        raise DitasError(f"{args.quantized} is a quantized class-conditional DiT: sample it with --model "
                         f"{args.quantized} alone (--quantized goes with a text-to-image pipeline)")
    args.model, args.quantized = args.quantized, None


def _class_conditional(model, path) -> torch.nn.Module:
    """``model`` as ditas' samplers take it: a diffusers ``DiTTransformer2DModel`` (float or
    quantized, e.g. saved by ``ditas.save_quantized``) through its class-conditional view; a
    text-to-image transformer is refused with what to give instead."""
    if type(model).__name__ == "DiTTransformer2DModel":
        from ..model.adapters.diffusers_dit import ClassConditionalView

        return ClassConditionalView(model)
    if not hasattr(model.config, "space"):
        raise DitasError(f"{path} holds a {type(model).__name__}, the transformer of a text-to-image pipeline: "
                         "sample it with --quantized DIR --prompt TEXT")
    return model


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..distributed import init_from_env, leave_together, shutdown
    from ..quantization.attention import check_attention_mode

    if args.attention is not None:  # an unknown --attention: one line, before any work
        check_attention_mode(args.attention, "--attention")
    device = resolve_device(args.device)
    rank, world, device = init_from_env(device)
    try:
        return leave_together(_run(args, device, rank, world))
    finally:
        shutdown()


def _run(args: argparse.Namespace, device, rank: int, world: int) -> int:
    from .. import api
    from ..loaders import load_dit  # the api layer's loader of any model or folder
    from ..diffusion.images import check_labels
    from ..fileio import check_new_file, check_not_input
    from ..validate import check_sampling_options
    from ..dtypes import cli_dtype

    _quantized_dit_as_model(args)
    if _text_to_image.wants_pipeline_sample(args):  # a diffusers text-to-image pipeline (PixArt, SD3, Flux)
        if args.attention not in (None, "fp32"):
            raise DitasError("--attention applies to ditas DiT models, not to diffusers pipelines")
        video = _video.is_video_run(args, _video.pipeline_dir_of(args, strict=False))  # or text-to-video
        return (_video if video else _text_to_image).sample(args, device, world)
    _video.is_video_run(args, None)  # --frames / --fps are refused for a DiT
    out, per_image = Path(args.out), is_folder_target(args.out)  # DIR/: one PNG per image
    if out.suffix.lower() not in (".png", ".npz") and not per_image:
        raise DitasError(f"--out must end in .png or .npz, or name a folder (DIR/), got {out}")
    if world > 1 and (per_image or out.suffix.lower() != ".npz"):
        raise DitasError("several processes (torchrun) write an .npz only: give --out X.npz")
    if not per_image:
        check_new_file(out, args.overwrite)
    check_not_input(out, [args.model, args.vae, getattr(args, "quantized", None), args.shard_dir])
    check_sampling_options(steps=args.steps, cfg_scale=args.cfg_scale, eta=args.eta, seed=args.seed)
    if args.num is not None and args.num < 1:
        raise DitasError(f"--num must be at least 1, got {args.num}")
    if args.batch_size < 1:
        raise DitasError(f"--batch-size must be at least 1, got {args.batch_size}")
    classes = _parse_classes(args.classes)
    model = _class_conditional(load_dit(args.model, device=device, kernel=args.kernel,
                                        dtype=cli_dtype(args.dtype, pipeline=False)), args.model)
    if args.attention:
        api.use_attention(model, args.attention)
    if args.space:
        model.config.space = args.space
    vae = None
    if model.config.space == "latent":
        vae_path = args.vae
        if vae_path is None and args.model and (Path(args.model) / "vae").is_dir():
            vae_path = Path(args.model) / "vae"
        if vae_path is None:
            raise DitasError("this model works in a VAE latent space: give --vae PATH "
                             "(a local diffusers AutoencoderKL folder)")
        vae = api.load_vae(vae_path).to(device)
    n = args.num or (len(classes) if classes else 16)
    if classes:
        check_labels(model, classes)  # before the output size check and the sampling
    check_output_size(out, n, model.config)  # before sampling: a grid too large, or a disk too small
    if classes:
        labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    else:
        g = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(0, model.num_classes, (n,), generator=g)
    paths = folder_paths(out, labels.tolist(), args.overwrite) if per_image else None
    written = api.sample(model, labels, steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
                         eta=args.eta, seed=args.seed, guide_channels=None if args.guide_all_channels else 3,
                         batch_size=args.batch_size, vae=vae, out=None if per_image else out, overwrite=args.overwrite,
                         nrow=len(classes) if classes and len(classes) <= 16 else None, shard_size=args.shard_size,
                         shard_dir=args.shard_dir, progress=not args.no_progress)
    if per_image:
        written = write_images(written, paths)
    if written is not None:
        print(f"wrote {n} images to {out}" + (f" ({world} processes)" if world > 1 else ""))
    return 0
