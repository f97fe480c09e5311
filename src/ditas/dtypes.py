"""Compute dtypes: the names ``--dtype`` / ``dtype=`` accept, and keeping stored precisions.

A quantized model computes in whatever float dtype its float parts are in (fp32, bf16, fp16): the
quantized layers take and return that dtype. What they store keeps the precision the checkpoint
declares: the integer codes their integer dtype, scales, zero points, bias and smoothing factors
fp32, the LoRA factors their ``lora_dtype``. ``model.to(torch.bfloat16)`` therefore casts the
float model around the quantized layers and only *moves* the layers' own tensors
(:func:`device_only`), so a cast never rounds a scale and a save after a cast writes the same
quantized tensors.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a torch float dtype (None stays None: "as the model is"); anything else is a
    one-line ``ConfigError``."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.strip().lower(), dtype.strip().lower()).removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise ConfigError(f"dtype {str(dtype)[:40]!r} is not a compute dtype; use one of {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def device_only(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` of ``Module._apply`` (``.to``, ``.cuda``, ``.half``, ``.type``, ...) limited to moving
    a tensor: where ``fn`` would change a tensor's dtype (seen on an empty probe, so the values are
    never rounded), the tensor goes only to ``fn``'s device; other functions apply as they are."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        if probe.dtype == t.dtype:
            return fn(t)
        return t.to(probe.device)

    return apply


def float_dtype(module: torch.nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the module's first floating-point parameter (its compute dtype), else ``default``."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


# what a model computes in when the user does not say, as its publishers ship it: text-to-image
# pipelines (PixArt, SD3, Flux) in bf16, class-conditional DiT in fp32
PIPELINE_DEFAULT, DIT_DEFAULT = torch.bfloat16, torch.float32


def add_dtype_argument(parser) -> None:
    """The ``--dtype`` option of ``quantize`` and ``sample`` (default None: by what the model is)."""
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="compute dtype of the model (default: bfloat16 for text-to-image pipelines, float32 "
                             "for DiT, as their publishers ship them); quantized layers keep their integer codes, "
                             "fp32 scales and LoRA storage whatever it is")


def cli_dtype(name: str | None, pipeline: bool) -> torch.dtype:
    """The ``--dtype`` value as a torch dtype, or the default for a pipeline / a DiT."""
    if name is None:
        return PIPELINE_DEFAULT if pipeline else DIT_DEFAULT
    return resolve_dtype(name)


__all__: list[Any] = ["DTYPES", "resolve_dtype", "dtype_name", "device_only", "float_dtype", "add_dtype_argument",
                      "cli_dtype"]
