"""The Python API, torchao-style: one config, one verb that applies it in place.

    import ditas
    with ditas.record_calibration(pipe.transformer) as calib:   # records every call of the transformer
        pipe(prompts, num_inference_steps=20)                     # any code that calls it
    report = ditas.quantize_(pipe.transformer, ditas.recipe_config("ditas", w_bits=4, a_bits=8), calib)
    ditas.save_quantized(pipe.transformer, "out/pixart-w4a8")
    pipe.transformer = ditas.load_quantized("out/pixart-w4a8", device="cuda")

For class-conditional DiT models ``calib`` may be omitted: the model samples its own calibration
run (the config's labels, steps, guidance scale, sampler and seed). The model's family is found by
its adapter (``model/adapters``); see ``docs/api.md``.

This module is the face of the workflow layer that the ``ditas`` commands call too: load
(``load_dit`` for any model or folder, ``load_quantized``, ``load_vae``), calibrate
(``record_calibration``), quantize (``quantize_``), choose kernels and attention
(``use_kernels``, ``use_attention``), sample (``sample``: the one sharded batch loop of
``diffusion.batches``) and save (``save_quantized``, ``write_quantized``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .calibration.recording import record_calibration
from .diffusers_quantizer import attach
from .errors import CheckpointError, ConfigError, DitasError
from .loaders import load_dit
from .model.adapters.base import CalibrationRecord
from .model.vae import load_vae
from .quantization.attention import use_attention
from .quantization.config import QuantConfig
from .quantization.kernels import use_kernels
from .quantization.recipes import recipe_config

__all__ = ["record_calibration", "quantize_", "save_quantized", "write_quantized", "load_quantized", "load_dit",
           "load_vae", "recipe_config", "use_kernels", "use_attention", "sample"]


def quantize_(model: nn.Module, config: QuantConfig | str = "ditas", calib: CalibrationRecord | None = None, *,
              progress: bool = False, kernel: str = "auto") -> dict[str, Any]:
    """Quantizes ``model`` in place (its linears become ``QuantLinear``, smoothing factors folded);
    returns the JSON-able report. ``config``: a ``QuantConfig`` or a recipe name. ``calib``: a
    ``record_calibration`` record (None: the model samples its own run, DiT families only).
    ``kernel``: ``auto`` (the kernels ``load_quantized`` gives the saved folder) or a name in
    ``ditas.quantization.kernels.KERNELS``. A self-calibration run that would not fit the model's
    device is refused before it starts."""
    from .diffusion.run import model_device
    from .quantization.apply import quantize
    from .quantization.kernels import canonical
    from .validate import calibration_memory_problem, check_problems, type_problem

    check_problems(type_problem(model, nn.Module, "model", "a torch.nn.Module"),
                   calib is not None and type_problem(calib, CalibrationRecord, "calib",
                                                      "a record of ditas.record_calibration (or None)"),
                   type_problem(progress, bool, "progress", "True or False"))
    canonical(kernel)  # an unknown kernel fails before any layer is converted
    if isinstance(config, str):
        config = recipe_config(config)
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig or a recipe name, got {type(config).__name__}")
    if calib is None:
        check_problems(calibration_memory_problem(model, config, model_device(model)))
    _, report = quantize(model, config, calib, progress=progress, kernel=kernel, inplace=True)
    model.quant_report = report
    attach(model)  # diffusers' save_pretrained of it round-trips (or refuses)
    return report


def save_quantized(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Writes a model quantized by ``quantize_`` as a folder (``config.json`` with the family,
    ``model.safetensors``, ``report.json``), atomically."""
    from .quantization.checkpoint import save_quantized as _save
    from .validate import check_problems, path_problem, type_problem

    check_problems(type_problem(model, nn.Module, "model", "a torch.nn.Module"), path_problem(path, "path"),
                   type_problem(overwrite, bool, "overwrite", "True or False"))
    config = getattr(model, "quant_config", None)
    if config is None:
        raise CheckpointError("the model is not quantized: call ditas.quantize_(model, config) first")
    return _save(model, path, config, getattr(model, "quant_report", None), overwrite=overwrite)


def write_quantized(model: nn.Module, folder: str | os.PathLike) -> None:
    """Writes a model quantized by ``quantize_`` (config and weights, not the report) into the
    existing ``folder``, e.g. a folder claimed by ``fileio.output_dir`` that is published later."""
    from .quantization.checkpoint import write_quantized as _write

    config = getattr(model, "quant_config", None)
    if config is None:
        raise CheckpointError("the model is not quantized: call ditas.quantize_(model, config) first")
    _write(model, Path(folder), config)


def load_quantized(path: str | os.PathLike, device: Any = None, kernel: str = "auto",
                   dtype: Any = "float32") -> nn.Module:
    """The quantized model of a ``save_quantized`` folder, in its family's class, on ``device``,
    its layers on ``kernel`` (``auto``: the most preferred kernel that supports each layer there).
    ``dtype`` (``torch.bfloat16`` or ``"bfloat16"``, float16, float32; default float32, as diffusers'
    ``from_pretrained``; None: as saved): what the model computes in, i.e. the dtype of the pipeline
    it goes into; the integer codes, scales and LoRA factors keep the precision the folder declares
    (``ditas.dtypes``)."""
    from .devices import resolve_device
    from .dtypes import resolve_dtype
    from .quantization.checkpoint import load_quantized as _load
    from .quantization.kernels import canonical
    from .validate import check_problems, path_problem

    check_problems(path_problem(path, "path"))
    if device is not None:
        device = resolve_device(device)  # as load_dit: a device that is not there is a one-line error
    canonical(kernel)
    model = _load(path, None, kernel=kernel, device=device, dtype=resolve_dtype(dtype))
    attach(model)  # diffusers' save_pretrained of it round-trips (or refuses)
    return model


def sample(model: nn.Module, labels: Sequence[int] | torch.Tensor, *, steps: int = 50, cfg_scale: float | None = 4.0,
           sampler: str = "ddpm", eta: float = 0.0, seed: int = 0, guide_channels: int | None = 3,
           batch_size: int = 64, vae=None, out: str | os.PathLike | None = None, overwrite: bool = False,
           nrow: int | None = None, shard_size: int | None = None, shard_dir: str | os.PathLike | None = None,
           progress: bool = False) -> np.ndarray | Path | None:
    """One image per label from a class-conditional DiT (float or quantized), sample ``i``'s noise
    from (``seed``, i) only: the same images whatever ``batch_size`` (for per-tensor activation
    scales keep it) and the number of ``torchrun`` processes.

    ``out=None``: returns the uint8 images (N, H, W, 3), on every process. ``out="x.npz"``: writes
    them through ``diffusion.sharded.sample_npz`` (resumable shards, split over processes, the
    ADM evaluator's layout) and returns the path on process 0, None on the others.
    ``out="x.png"``: one process writes a grid of ``nrow`` images per row; returns the path.
    ``vae``: the decoder of a latent-space model (``load_vae``).
    """
    from .diffusion import sharded
    from .diffusion.batches import sample_images
    from .diffusion.images import check_labels, make_grid, save_png
    from .diffusion.run import SamplingSettings
    from .distributed import process_group
    from .fileio import check_new_file

    settings = SamplingSettings(steps=steps, cfg_scale=cfg_scale, sampler=sampler, eta=eta, seed=seed,
                                guide_channels=guide_channels)
    labels = check_labels(model, labels)
    if out is None:
        return sample_images(model, labels, settings, batch_size, vae, progress)
    out = Path(out)
    if out.suffix.lower() == ".npz":
        return sharded.sample_npz(model, labels, out, settings, batch_size=batch_size, shard_size=shard_size,
                                  shard_dir=shard_dir, vae=vae, progress=progress, overwrite=overwrite)
    if out.suffix.lower() != ".png":
        raise DitasError(f"out must end in .png or .npz, got {out}")
    if process_group()[1] > 1:
        raise DitasError("several processes (torchrun) write an .npz only: give an .npz")
    check_new_file(out, overwrite)
    save_png(make_grid(sample_images(model, labels, settings, batch_size, vae, progress), nrow=nrow), out)
    return out
