"""Reading state dicts from files without executing code (safetensors, ``weights_only`` torch.load),
and a folder's ``config.json``.

A leaf module: the float loader (``model/loading.py``) and the quantized loader
(``quantization/checkpoint.py``) both read through it, so neither imports the other's module for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..readers import safe_reason


def read_config_json(cfg_file: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder (a JSON object, read by ``readers.read_json``);
    anything else is a one-line ``CheckpointError``."""
    from ..readers import read_json

    return read_json(cfg_file, "model config", error=CheckpointError)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def read_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, forbidden globals, ...
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({safe_reason(exc)})") from None
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or one under 'model'/'ema')")
    return {k.removeprefix("module."): v for k, v in obj.items()}
