"""Reading state dicts from files without executing code (safetensors, ``weights_only`` torch.load),
and a folder's ``config.json``.

A leaf module: the float loader (``model/loading.py``) and the quantized loader
(``quantization/checkpoint.py``) both read through it, so neither imports the other's module for it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


def read_config_json(cfg_file: Path) -> Any:
    """The parsed ``config.json`` of a model folder; unreadable JSON is a ``CheckpointError``."""
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from None


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


def _pt_reason(exc: Exception) -> str:
    """torch's own message, less its advice to load with ``weights_only=False`` (which can run code
    from the file): the offending global when it names one, else its first line."""
    text = str(exc).strip()
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it holds a Python object of type {m.group(1)}, not only tensors; ditas does not run code from files"
    if "weights_only" in text or "Weights only load failed" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
                 and "Weights only load failed" not in ln and "trust" not in ln]
        return lines[-1] if lines else "it holds objects other than tensors"
    return text.splitlines()[0] if text else type(exc).__name__


def read_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, forbidden globals, ...
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({_pt_reason(exc)})") from None
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or one under 'model'/'ema')")
    return {k.removeprefix("module."): v for k, v in obj.items()}
