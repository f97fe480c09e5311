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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .calibration.recording import record_calibration
from .errors import CheckpointError, ConfigError
from .model.adapters.base import CalibrationRecord
from .quantization.config import QuantConfig
from .quantization.recipes import recipe_config

__all__ = ["record_calibration", "quantize_", "save_quantized", "load_quantized", "recipe_config"]


def quantize_(model: nn.Module, config: QuantConfig | str = "ditas", calib: CalibrationRecord | None = None, *,
              progress: bool = False, kernel: str = "auto") -> dict[str, Any]:
    """Quantizes ``model`` in place (its linears become ``QuantLinear``, smoothing factors folded);
    returns the JSON-able report. ``config``: a ``QuantConfig`` or a recipe name. ``calib``: a
    ``record_calibration`` record (None: the model samples its own run, DiT families only).
    ``kernel``: ``auto`` (the kernels ``load_quantized`` gives the saved folder) or a name in
    ``ditas.quantization.kernels.KERNELS``."""
    from .quantization.apply import quantize
    from .quantization.kernels import canonical
    from .validate import check_problems, type_problem

    check_problems(type_problem(model, nn.Module, "model", "a torch.nn.Module"),
                   calib is not None and type_problem(calib, CalibrationRecord, "calib",
                                                      "a record of ditas.record_calibration (or None)"),
                   type_problem(progress, bool, "progress", "True or False"))
    canonical(kernel)  # an unknown kernel fails before any layer is converted
    if isinstance(config, str):
        config = recipe_config(config)
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig or a recipe name, got {type(config).__name__}")
    _, report = quantize(model, config, calib, progress=progress, kernel=kernel, inplace=True)
    model.quant_report = report
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
    return _load(path, None, kernel=kernel, device=device, dtype=resolve_dtype(dtype))
