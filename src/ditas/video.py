"""Text-to-video diffusers pipelines (Wan, CogVideoX, LTX, HunyuanVideo, Mochi, ...): which
pipeline folders are video pipelines, the frame counts they make, a clip as uint8 frames (made by
``pipelines.generate_video``), and the clip written as .mp4 (imageio with the ffmpeg of the imageio-ffmpeg wheel), .gif
(PIL) or a folder of numbered PNG frames.

A video pipeline is recognised by what diffusers says of it, not by a list of names: the class
that ``model_index.json`` names takes ``num_frames`` and ``prompt`` and needs no other input (an
image-to-video pipeline, which needs ``image``, is refused in one line). Everything else about
loading, calibration and the quantized transformer is ``pipelines.py``'s, as for text-to-image.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DitasError

VIDEO_EXTRA = "pip install 'ditas[video]'"  # imageio + imageio-ffmpeg
DEFAULT_LATENT_FRAMES = 5  # default clip: 1 + 4 x the VAE's temporal factor (Wan: 17 frames)
DEFAULT_FPS = 16
# frame rates the models were trained at (by pipeline class prefix); others get DEFAULT_FPS
_FPS = {"Wan": 16, "CogVideoX": 8, "LTX": 24, "HunyuanVideo": 15, "Mochi": 30}
# where pipelines keep the VAE's temporal compression (the name differs between pipelines)
_TEMPORAL_ATTRS = ("vae_scale_factor_temporal", "vae_temporal_compression_ratio", "vae_temporal_scale_factor")
_TEMPORAL_KEYS = ("scale_factor_temporal", "temporal_compression_ratio")  # the same, in a VAE's config.json


# ----------------------------------------------------------------------------------------------
#                                   Which folders are video pipelines
# ----------------------------------------------------------------------------------------------


def pipeline_class(index: dict[str, Any]) -> type | None:
    """The diffusers pipeline class a ``model_index.json`` names (None: not a diffusers class)."""
    import diffusers

    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline) else None


def is_video_index(index: dict[str, Any]) -> bool:
    """Whether the pipeline of this ``model_index.json`` makes videos (its call takes ``num_frames``)."""
    cls = pipeline_class(index)
    return cls is not None and "num_frames" in inspect.signature(cls.__call__).parameters


def _index(path: str | os.PathLike) -> dict[str, Any] | None:
    from .readers import read_json

    if not (Path(path) / "model_index.json").is_file():
        return None
    try:
        return read_json(Path(path) / "model_index.json", "pipeline index")
    except DitasError:
        return None  # unreadable: the image path's loader says what is wrong


def is_video_pipeline(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a diffusers video pipeline folder (see the module docstring)."""
    index = _index(path) if path is not None else None
    return index is not None and is_video_index(index)


def check_text_to_video(path: str | os.PathLike) -> None:
    """Refuses a video pipeline that needs more than a prompt (image-to-video, video-to-video),
    naming what it needs; ditas calibrates and samples from prompts only."""
    cls = pipeline_class(_index(path) or {})
    params = inspect.signature(cls.__call__).parameters if cls is not None else {}
    if "prompt" not in params:
        raise DitasError(f"{path}: {cls.__name__ if cls else 'this pipeline'} takes no text prompt; ditas "
                         "quantizes and samples text-to-video pipelines")
    needs = [n for n, p in list(params.items())[1:] if p.default is inspect.Parameter.empty
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needs:
        raise DitasError(f"{path}: {cls.__name__} needs {', '.join(needs)} besides the prompt; ditas quantizes and "
                         "samples text-to-video pipelines (calibrate its transformer in Python with "
                         "ditas.record_calibration around your own pipeline calls)")


# ----------------------------------------------------------------------------------------------
#                                         Frame counts
# ----------------------------------------------------------------------------------------------


def config_temporal_factor(path: str | os.PathLike) -> int | None:
    """The VAE's temporal compression as its ``config.json`` states it, read before anything is
    loaded (None where the config does not say; the loaded pipeline is asked then)."""
    from .readers import read_json

    f = Path(path) / "vae" / "config.json"
    if not f.is_file():
        return None
    try:
        cfg = read_json(f, "vae config", foreign=True)
    except DitasError:
        return None  # the loader reports an unreadable config
    return next((v for k in _TEMPORAL_KEYS if _positive_int(v := cfg.get(k))), None)


def temporal_factor(pipe) -> int:
    """Frames per latent frame of a loaded video pipeline (1 where it does not compress time)."""
    return next((v for a in _TEMPORAL_ATTRS if _positive_int(v := getattr(pipe, a, None))), 1)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def default_frames(factor: int) -> int:
    """A short clip every video pipeline makes whole: ``1 + 4 x factor`` frames (Wan: 17)."""
    return 1 + (DEFAULT_LATENT_FRAMES - 1) * factor


def frames_problem(frames: int | None, factor: int | None = None, name: str = "this pipeline") -> str | None:
    """``--frames`` must be a count the pipeline makes exactly, ``1 + k x factor`` (pipelines round
    others silently or fail late)."""
    if frames is None:
        return None
    if frames < 1:
        return f"--frames must be at least 1, got {frames}"
    if factor and (frames - 1) % factor:
        lo = frames - (frames - 1) % factor
        return (f"--frames {frames}: {name} makes 1 + k x {factor} frames (its VAE compresses {factor} frames "
                f"into one); give {lo} or {lo + factor}")
    return None


def frames_for(pipe, frames: int | None) -> int:
    """The clip length of a run on the loaded ``pipe``: ``frames`` checked, or the default."""
    factor = temporal_factor(pipe)
    problem = frames_problem(frames, factor, type(pipe).__name__)
    if problem:
        raise DitasError(problem)
    return frames if frames is not None else default_frames(factor)


def default_fps(pipe) -> int:
    """The frame rate of the pipeline's model family (16 where unknown)."""
    name = type(pipe).__name__
    return next((fps for prefix, fps in _FPS.items() if name.startswith(prefix)), DEFAULT_FPS)


# ----------------------------------------------------------------------------------------------
#                                         One clip
# ----------------------------------------------------------------------------------------------


def pipeline_call(pipe, **kwargs):
    """``pipe(**kwargs)``; a pipeline's refusal of its inputs (``check_inputs`` raises ValueError
    before any step: a size its VAE and patches cannot take) becomes one line."""
    try:
        return pipe(**kwargs)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DitasError(f"{type(pipe).__name__} refused the run: {first}") from None


def to_uint8_frames(frames) -> np.ndarray:
    """One clip as ``(frames, height, width, 3)`` uint8, from what a pipeline's ``.frames[0]`` holds
    (floats in [0, 1] as an array or tensor, or a list of PIL images)."""
    if isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "convert"):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    a = frames.float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise DitasError(f"the pipeline returned frames of shape {a.shape}, not (frames, height, width, channels)")
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


# ----------------------------------------------------------------------------------------------
#                                          Writers
# ----------------------------------------------------------------------------------------------


def output_kind(out: str | os.PathLike) -> str:
    """``mp4``, ``gif`` or ``frames`` (a folder of PNGs: a name ending in ``/`` or without suffix)."""
    text = os.fspath(out)
    if text.endswith(("/", os.sep)) or not Path(text).suffix:
        return "frames"
    suffix = Path(text).suffix.lower()
    if suffix in (".mp4", ".gif"):
        return suffix[1:]
    raise DitasError(f"--out {text}: a video is written as .mp4, .gif, or a folder of PNG frames (a name "
                     "ending in '/'); unknown extension " + repr(suffix))


def check_writer(kind: str) -> None:
    """Before any work: the libraries ``kind`` needs are there (mp4: imageio and the ffmpeg binary
    of the imageio-ffmpeg wheel)."""
    if kind != "mp4":
        return
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise DitasError(f"writing .mp4 needs imageio and imageio-ffmpeg ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'missing'}): {VIDEO_EXTRA}, "
                         "or write --out clip.gif / frames/") from None


def check_fps(fps: float | None) -> None:
    if fps is not None and not (math.isfinite(fps) and 0 < fps <= 1000):
        raise DitasError(f"--fps must be a frame rate in (0, 1000], got {fps}")


def write_video(frames: np.ndarray, out: str | os.PathLike, fps: float, overwrite: bool = False,
                info: dict[str, Any] | None = None, inputs=()) -> Path:
    """Writes the uint8 clip ``frames`` (F, H, W, 3) to ``out`` as its name says (``output_kind``),
    atomically: a file appears whole, a frames folder appears with all its frames (and a
    ``config.json`` holding ``info``, fps and frame count, and ditas' marker) or not at all."""
    kind = output_kind(out)
    check_writer(kind)
    path = output_path(out)
    if kind == "frames":
        return _write_frames(frames, path, fps, overwrite, info, inputs)
    from .fileio import atomic_file

    with atomic_file(path) as tmp:
        (_write_mp4 if kind == "mp4" else _write_gif)(frames, tmp, fps)
    return path


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    """H.264 (yuv420p, what every player reads) through imageio's ffmpeg writer."""
    import imageio.v2 as iio

    writer = iio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=2)
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    """An endlessly looping GIF (PIL); GIF keeps frame times in whole 1/100 s (16 fps: 60 ms)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=10 * max(1, round(100 / fps)),
                   loop=0)


def frame_name(i: int, n: int) -> str:
    """``frame_00000.png``: numbered so that names sort in frame order."""
    return f"frame_{i:0{max(5, len(str(n - 1)))}d}.png"


def _write_frames(frames: np.ndarray, path: Path, fps: float, overwrite: bool, info: dict[str, Any] | None,
                  inputs) -> Path:
    from PIL import Image

    from .fileio import json_text, output_dir

    with output_dir(path, "ditas-video-frames", overwrite=overwrite, inputs=inputs) as claim:
        for i, f in enumerate(frames):
            Image.fromarray(f).save(claim.tmp / frame_name(i, len(frames)), format="PNG")
        meta = {**(info or {}), "frames": len(frames), "fps": fps}
        (claim.tmp / "config.json").write_text(json_text(meta, "config.json"))
        return claim.publish()


def check_output(out: str | os.PathLike, overwrite: bool, inputs) -> str:
    """Before any work: ``out`` names a video output that may be written (kind, libraries, a new
    file or folder, or one ditas wrote with ``overwrite``); returns its kind."""
    from .fileio import check_new_file, check_not_input, check_output_dir

    kind = output_kind(out)
    check_writer(kind)
    path = output_path(out)
    check_not_input(path, inputs)
    if kind != "frames":
        check_new_file(path, overwrite)
        return kind
    check_output_dir(path, overwrite, inputs)
    return kind


def output_path(out: str | os.PathLike) -> Path:
    """``out`` as a path (``frames/`` names the folder ``frames``)."""
    return Path(os.fspath(out).rstrip("/" + os.sep) or os.fspath(out))
