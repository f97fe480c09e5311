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
PROMPTS_FILE = Path(__file__).resolve().parent / "assets" / "calibration_prompts.txt"


def is_pipeline_dir(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (has ``model_index.json``)."""
    return path is not None and (Path(path) / "model_index.json").is_file()


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

    supported = text_to_image_transformers()
    if cls_name == "DiTTransformer2DModel":  # class-conditional: no prompts, ditas' DiT commands
        raise DitasError(f"{path} is a DiTPipeline (class labels, no prompts): give its transformer folder "
                         f"(--model {path / 'transformer'} --vae {path / 'vae'}), or in Python "
                         "ditas.quantize_(pipe.transformer) then pipe.save_pretrained(dir)")
    if cls_name not in supported:
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
        return DiffusionPipeline.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: diffusers could not load this pipeline ({first})") from None


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
    if height is not None:
        kw["height"] = height
    if width is not None:
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
                                progress: bool = True, calib_cache: str | os.PathLike | None = None):
    """Runs ``pipe`` on ``prompts`` (latents only, no decoding) inside ``record_calibration``:
    the data-free calibration record of its transformer (one call per step and batch); its block
    calls streamed under ``calib_cache`` when given."""
    from .calibration.recording import record_calibration

    if steps < 2:
        raise DitasError(f"calibration steps must be at least 2, got {steps}")
    if not prompts:
        raise DitasError("no calibration prompts")
    _quiet(pipe, progress)
    with record_calibration(pipe.transformer, calib_cache) as calib:
        for i in range(0, len(prompts), batch_size):
            pipe(prompt=prompts[i: i + batch_size],
                 **_call_kwargs(pipe, steps, guidance, seed + i, height, width, "latent"))
    calib.info.update({"prompts": len(prompts), "steps": steps, "guidance_scale": guidance, "seed": seed,
                       "height": height, "width": width})
    return calib


@torch.no_grad()
def generate_images(pipe, prompt: str | list[str], steps: int, guidance: float | None = None, seed: int = 0,
                    height: int | None = None, width: int | None = None, progress: bool = True) -> list:
    """PIL images for ``prompt`` (one per prompt)."""
    _quiet(pipe, progress)
    return pipe(prompt=prompt, **_call_kwargs(pipe, steps, guidance, seed, height, width, "pil")).images


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
