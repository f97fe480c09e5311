"""``load_dit``: a DiT from whatever the user has, float or quantized.

It sits above both readers so that neither climbs to the other: ``model/loading.py`` reads float
files and folders (published ``.pt``, ``.safetensors``, ditas and diffusers folders) and
``quantization/checkpoint.py`` reads quantized folders. This module reads a folder's
``config.json`` once and hands it to the reader it names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .devices import resolve_device
from .diffusers_quantizer import attach
from .errors import CheckpointError
from .memory import release_freed_memory
from .model.dit import DiTConfig
from .model.loading import default_model_path, load_float_dit, read_folder_config
from .quantization.checkpoint import is_ditas_config, load_quantized


def load_dit(path: str | os.PathLike | None = None, config: DiTConfig | None = None,
             device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = "float32",
             **kwargs: Any) -> torch.nn.Module:
    """Loads a DiT (float or ditas-quantized) in eval mode. ``None``: the embedded default model.

    ``device``: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"`` / None (CUDA when
    available); a device that is not there is a ``DitasError``. The model is built on the meta
    device and its weights are materialised on ``device`` directly. Extra keyword arguments go to
    the quantized-model loader (``kernel=``: ``"auto"`` by default; see ``quantization.kernels``).
    ``dtype``: what the model computes in (``float32`` by default, ``bfloat16``, ``float16``; None: as
    saved); a quantized model's codes, scales and LoRA factors keep their precision.
    """
    from .dtypes import resolve_dtype
    from .validate import check_problems, path_problem, type_problem

    check_problems(path_problem(path, "path", optional=True),
                   config is not None and type_problem(config, DiTConfig, "config", "a DiTConfig (or None)"))
    dtype = resolve_dtype(dtype)
    model = _load(path, config, resolve_device(device), dtype, **kwargs)
    release_freed_memory()  # the file's bytes, freed now (glibc keeps freed heap otherwise)
    return model


def _load(path, config: DiTConfig | None, device: torch.device, dtype: torch.dtype | None,
          **kwargs: Any) -> torch.nn.Module:
    """Picks the reader: a folder whose config has a ``quantization`` table is quantized."""
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        model = load_float_dit(path, config, device)
    else:
        folder, data = read_folder_config(path)
        quantized = "quantization" in data and data.get("_class_name") != "DiTTransformer2DModel"
        if quantized or is_ditas_config(data):  # a ditas folder, or one diffusers' save_pretrained wrote
            model = load_quantized(folder, data, device=device, dtype=dtype, **kwargs)
            attach(model)  # diffusers' save_pretrained of it round-trips (or refuses)
            return model
        model = load_float_dit(folder, config, device, data)
    return model if dtype is None else model.to(dtype)
