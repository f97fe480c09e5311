"""diffusers text-to-image pipelines (PixArt, SD3, Flux): load a local pipeline folder, record a
data-free calibration run from prompts, generate images, and remember where a quantized
transformer came from.

A quantized pipeline transformer is a folder written by ``ditas.save_quantized`` plus
``pipeline.json`` (``PIPELINE_FILE``): the absolute path and class of the pipeline folder it was
quantized from, so that ``ditas sample --quantized DIR`` rebuilds the whole pipeline (text
encoders, VAE, scheduler) from there without being told again.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, DitasError

PIPELINE_FILE = "pipeline.json"
LABEL_TRANSFORMER = "DiTTransformer2DModel"  # DiTPipeline: class labels instead of prompts
PROMPTS_FILE = Path(__file__).resolve().parent / "assets" / "calibration_prompts.txt"


def is_pipeline_dir(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (has ``model_index.json``)."""
    return path is not None and (Path(path) / "model_index.json").is_file()


def is_label_pipeline(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a pipeline folder whose transformer takes class labels (``DiTPipeline``)
    rather than prompts: sampled with ``--classes`` and calibrated on labels."""
    if not is_pipeline_dir(path):
        return False
    from .readers import read_json

    entry = read_json(Path(path) / "model_index.json", "pipeline index", error=CheckpointError).get("transformer")
    return isinstance(entry, list) and entry[-1] == LABEL_TRANSFORMER


def class_count(path: str | os.PathLike) -> int:
    """The number of classes of a ``DiTPipeline`` folder's transformer (its ``num_embeds_ada_norm``)."""
    n = _read_json_object(Path(path) / "transformer" / "config.json").get("num_embeds_ada_norm")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CheckpointError(f"{path}/transformer/config.json: num_embeds_ada_norm is {n!r}, not a class count")
    return n


def check_label_guidance(path: str | os.PathLike, guidance: float | None, flag: str) -> int:
    """The class count of a ``DiTPipeline`` folder, after refusing a guided run (``guidance``, None:
    the pipeline's default) of a model without 1000 classes: diffusers' ``DiTPipeline`` hard-codes
    the null label 1000 (ImageNet's), which another model's label table does not hold."""
    n = class_count(path)
    if guidance is None:
        guidance = call_defaults(path)["guidance_scale"]
    if guidance is not None and guidance > 1 and n != 1000:
        raise DitasError(f"{path}: DiTPipeline guides with the null label 1000 but this model has {n} classes: "
                         f"give {flag} 1 (no guidance)")
    return n


def call_defaults(pipe_or_class: Any) -> dict[str, Any]:
    """The pipeline's own ``num_inference_steps`` and ``guidance_scale`` (its ``__call__`` defaults:
    what its publisher samples with), so a calibration run left to its defaults sees the sampling
    it calibrates for; ``pipe_or_class``: a pipeline, its class, or a pipeline folder (nothing loaded)."""
    if isinstance(pipe_or_class, (str, os.PathLike)):
        import diffusers

        from .readers import read_json

        name = read_json(Path(pipe_or_class) / "model_index.json", "pipeline index", error=CheckpointError).get("_class_name")
        pipe_or_class = getattr(diffusers, name, None) if isinstance(name, str) else None
    call = getattr(pipe_or_class, "__call__", None)
    params = inspect.signature(call).parameters if callable(call) and pipe_or_class is not None else {}
    out = {}
    for key in ("num_inference_steps", "guidance_scale"):
        default = params[key].default if key in params else None
        out[key] = default if isinstance(default, (int, float)) and not isinstance(default, bool) else None
    return out


def _condition(pipe, batch: list) -> dict[str, Any]:
    """What ``pipe`` is conditioned on: ``class_labels`` (``DiTPipeline``) or ``prompt``."""
    if "class_labels" in inspect.signature(pipe.__call__).parameters:
        return {"class_labels": [int(v) for v in batch]}
    return {"prompt": batch}


def read_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """Prompts of a text file, one a line (``#`` comments and blank lines skipped); default: the
    calibration prompts shipped with ditas."""
    p = Path(path) if path is not None else PROMPTS_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DitasError(f"cannot read prompts from {p}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DitasError(f"{p} holds no prompts (one a line; '#' starts a comment)")
    return prompts


def load_pipeline(path: str | os.PathLike, transformer: torch.nn.Module | None = None,
                  dtype: torch.dtype | None = None):
    """The diffusers pipeline in the local folder ``path`` (nothing is downloaded); with
    ``transformer``, that module replaces the folder's transformer (which is then not loaded).
    ``dtype``: diffusers' ``torch_dtype`` of the components it loads (None: as saved); a given
    ``transformer`` keeps its own (``ditas.load_quantized(..., dtype=)``)."""
    path = Path(path)
    if not is_pipeline_dir(path):
        raise DitasError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    from .readers import read_json

    index = read_json(path / "model_index.json", "pipeline index", error=CheckpointError)
    entry = index.get("transformer")
    cls_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    from .model.adapters.registry import text_to_image_transformers

    supported = (*text_to_image_transformers(), LABEL_TRANSFORMER)
    from .video import is_video_index

    if cls_name not in supported and not is_video_index(index):  # video: any transformer an adapter takes
        raise DitasError(f"{path}: the pipeline's transformer is {cls_name or 'missing'}; ditas quantizes pipelines "
                         f"whose transformer is one of {', '.join(supported)}")
    from diffusers import DiffusionPipeline

    _check_pipeline_configs(path, index, cls_name, DiffusionPipeline)

    if transformer is not None and type(transformer).__name__ != cls_name:
        raise DitasError(f"the quantized transformer is a {type(transformer).__name__} but the pipeline in {path} "
                         f"holds a {cls_name}: give the pipeline it was quantized from")
    from .model.vae import quiet_load_kwargs

    kwargs: dict[str, Any] = {"local_files_only": True, **quiet_load_kwargs()}
    # components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None again
    kwargs.update({k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]})
    if transformer is not None:
        kwargs["transformer"] = transformer
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: diffusers could not load this pipeline ({first})") from None
    if transformer is not None and pipe.transformer is not transformer:
        # diffusers 0.42 loads the folder's transformer OVER a passed one where the pipeline's __init__
        # gives `transformer` a default (WanPipeline: transformer=None): put the given one back
        pipe.register_modules(transformer=transformer)
    return pipe


def _check_pipeline_configs(path: Path, index: dict, transformer_class: str, base: type) -> None:
    """The pipeline folder's JSON files as ditas's reader sees them, before diffusers parses them:
    a known pipeline class, each component's config readable (depth, size, an object), and the
    transformer's config naming the class ``model_index.json`` gives it."""
    import diffusers

    from .readers import Field, read_json

    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointError(f"pipeline index {path / 'model_index.json'}: '_class_name' {str(name)[:60]!r} is "
                              "not a diffusers pipeline class")
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry == [None, None]:
            continue
        for cfg in ("config.json", "scheduler_config.json"):
            f = path / component / cfg
            if f.exists() or f.is_symlink():
                schema = {"_class_name": Field(str, choices=(transformer_class,))} if component == "transformer" else None
                read_json(f, f"{component} config", schema, error=CheckpointError, foreign=True)


def _call_kwargs(pipe, steps: int, guidance: float | None, seed: int, height: int | None, width: int | None,
                 output_type: str) -> dict[str, Any]:
    params = inspect.signature(pipe.__call__).parameters
    kw: dict[str, Any] = {"num_inference_steps": steps, "output_type": output_type,
                          "generator": torch.Generator().manual_seed(seed)}
    if guidance is not None:
        kw["guidance_scale"] = guidance
    if height is not None and "height" in params:
        kw["height"] = height
    if width is not None and "width" in params:
        kw["width"] = width
    if "use_resolution_binning" in params:   # PixArt: use the size asked for, not the nearest bin
        kw["use_resolution_binning"] = False
    if "clean_caption" in params:            # PixArt: no caption cleaning (needs bs4/ftfy, changes prompts)
        kw["clean_caption"] = False
    return kw


def _quiet(pipe, progress: bool) -> None:
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress, leave=False)


@torch.no_grad()
def record_pipeline_calibration(pipe, prompts: list[str], steps: int, guidance: float | None = None, seed: int = 0,
                                height: int | None = None, width: int | None = None, batch_size: int = 4,
                                progress: bool = True, calib_cache: str | os.PathLike | None = None,
                                extra: dict[str, Any] | None = None):
    """Runs ``pipe`` on ``prompts`` (class labels for a ``DiTPipeline``; latents only, no decoding)
    inside ``record_calibration``: the data-free calibration record of its transformer (one call per
    step and batch); its block calls streamed under ``calib_cache`` when given. ``extra``: more
    arguments of every call (a video's ``num_frames``), also kept in ``calib.info``."""
    from .calibration.recording import record_calibration
    from .video import pipeline_call

    if steps < 2:
        raise DitasError(f"calibration steps must be at least 2, got {steps}")
    if not prompts:
        raise DitasError("no calibration prompts")
    _quiet(pipe, progress)
    with record_calibration(pipe.transformer, calib_cache) as calib:
        for i in range(0, len(prompts), batch_size):
            pipeline_call(pipe, **_condition(pipe, prompts[i: i + batch_size]), **(extra or {}),
                          **_call_kwargs(pipe, steps, guidance, seed + i, height, width, "latent"))
    kind = "labels" if "class_labels" in _condition(pipe, []) else "prompts"
    calib.info.update({kind: len(prompts), "steps": steps, "guidance_scale": guidance, "seed": seed,
                       "height": height, "width": width, **(extra or {})})
    return calib


@torch.no_grad()
def generate_images(pipe, prompt: str | list[str], steps: int, guidance: float | None = None, seed: int = 0,
                    height: int | None = None, width: int | None = None, progress: bool = True) -> list:
    """PIL images for ``prompt`` (one per prompt; class labels for a ``DiTPipeline``)."""
    _quiet(pipe, progress)
    batch = prompt if isinstance(prompt, list) else [prompt]
    return pipe(**_condition(pipe, batch), **_call_kwargs(pipe, steps, guidance, seed, height, width, "pil")).images


@torch.no_grad()
def generate_video(pipe, prompt: str, frames: int, steps: int, guidance: float | None = None, seed: int = 0,
                   height: int | None = None, width: int | None = None, progress: bool = True) -> Any:
    """The clip of ``prompt`` from a text-to-video pipeline: ``(frames, height, width, 3)`` uint8 numpy."""
    from .video import pipeline_call, to_uint8_frames

    _quiet(pipe, progress)
    out = pipeline_call(pipe, prompt=[prompt], num_frames=frames,
                        **_call_kwargs(pipe, steps, guidance, seed, height, width, "np"))
    return to_uint8_frames(out.frames[0])


def save_image_grid(images: list, path: str | os.PathLike, columns: int = 8, pad: int = 2) -> Path:
    """PIL images side by side (rows of ``columns``) in one PNG, written atomically."""
    from PIL import Image

    from .fileio import atomic_file

    images = [im.convert("RGB") for im in images]
    w, h = max(im.width for im in images), max(im.height for im in images)
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)


def pipeline_ref(pipeline_dir: str | os.PathLike, pipe) -> dict[str, Any]:
    """What ``pipeline.json`` records: the pipeline folder a quantized transformer came from."""
    return {"pipeline": str(Path(pipeline_dir).resolve()), "pipeline_class": type(pipe).__name__,
            "transformer_class": type(pipe.transformer).__name__}


def read_pipeline_ref(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The pipeline a quantized folder came from (None if it records none)."""
    p = Path(folder) / PIPELINE_FILE
    if not (p.exists() or p.is_symlink()):
        return None
    from .readers import Field, read_json

    return read_json(p, "pipeline reference", {"pipeline": Field(str), "pipeline_class": Field(str, required=False),
                                               "transformer_class": Field(str, required=False)},
                     error=CheckpointError)


# ----------------------------------------------------------------------------------------------
#                 What a pipeline folder must hold, and the image sizes it takes
# ----------------------------------------------------------------------------------------------


def _read_json_object(p: Path) -> dict[str, Any]:
    """A JSON object file of a pipeline folder, or a one-line ``CheckpointError`` naming it."""
    from .readers import read_json

    return read_json(p, p.name, error=CheckpointError, foreign=True)


def check_pipeline_components(path: str | os.PathLike, with_transformer: bool = True) -> dict[str, Any]:
    """Refuses a pipeline folder that lacks a component its ``model_index.json`` lists (a deleted
    ``tokenizer/`` made diffusers fall back to ``<unk>`` for every word, silently); returns the index.
    ``with_transformer=False``: the transformer comes from elsewhere (a quantized folder)."""
    path = Path(path)
    index = _read_json_object(path / "model_index.json")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry == [None, None]:
            continue
        if name == "transformer" and not with_transformer:
            continue
        if not (path / name).is_dir():
            raise CheckpointError(f"{path}: the pipeline lists the component '{name}' ({entry[-1]}) but has no "
                                  f"{name}/ folder; restore it (a pipeline without it would give wrong results)")
    return index


# Flux packs 2x2 latent patches itself; PixArt's pipeline wants multiples of 8 pixels whatever its VAE
_PACKED_PATCH = {"FluxTransformer2DModel": 2}
_PIXEL_MULTIPLE = {"PixArtTransformer2DModel": 8}
_DEFAULT_SAMPLE = {"FluxTransformer2DModel": 128}


def pipeline_geometry(path: str | os.PathLike, index: dict[str, Any]) -> dict[str, Any] | None:
    """What the sizes of a pipeline's images depend on, read from its config files (nothing is
    loaded): ``multiple`` (height and width must be multiples of it), ``default`` (the pipeline's
    own size), ``max`` (largest side, or None), ``pixels_per_token`` (side of one token in pixels)
    and ``width`` (the transformer's hidden size). None when the configs do not say."""
    import math

    path = Path(path)
    entry = index.get("transformer")
    cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    tfile, vfile = path / "transformer" / "config.json", path / "vae" / "config.json"
    if not tfile.is_file():
        return None
    t = _read_json_object(tfile)
    blocks = _read_json_object(vfile).get("block_out_channels") if vfile.is_file() else None
    scale = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8
    values = [t.get(k) for k in ("patch_size", "sample_size", "num_attention_heads", "attention_head_dim")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    patch, sample, heads, head_dim = values
    per_token = scale * _PACKED_PATCH.get(cls, patch)
    multiple = math.lcm(per_token, _PIXEL_MULTIPLE.get(cls, 1))
    max_pos = t.get("pos_embed_max_size")
    return {"class": cls, "multiple": multiple, "default": _DEFAULT_SAMPLE.get(cls, sample) * scale,
            "max": max_pos * per_token if isinstance(max_pos, int) and max_pos > 0 else None,
            "pixels_per_token": per_token, "width": heads * head_dim}


def image_size_problem(geometry: dict[str, Any], height: int | None, width: int | None) -> str | None:
    """Height and width the pipeline can take (multiples of what its VAE and patches need)."""
    for name, v in (("--height", height), ("--width", width)):
        if v is None:
            continue
        if v < 1 or v % geometry["multiple"]:
            return (f"{name} {v}: the {geometry['class']} pipeline takes multiples of {geometry['multiple']} pixels "
                    f"(its default is {geometry['default']})")
        if geometry["max"] is not None and v > geometry["max"]:
            return f"{name} {v}: the {geometry['class']} takes at most {geometry['max']} pixels (its position embedding)"
    return None


def tokens_of(geometry: dict[str, Any], height: int | None, width: int | None) -> int:
    """Image tokens of one transformer call at that size (None: the pipeline's default)."""
    h, w = height or geometry["default"], width or geometry["default"]
    return (h // geometry["pixels_per_token"]) * (w // geometry["pixels_per_token"])
