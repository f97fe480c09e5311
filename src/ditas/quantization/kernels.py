"""Kernels of ``QuantLinear``: named entries that say what they support; one call gives a model its kernels.

A kernel computes ``QuantLinear``'s product. Each entry declares the devices, weight layouts and
activation bits it handles and whether this torch build has it:

- ``onednn``: oneDNN's u8 x s8 quantized linear (``torch.ops.onednn.qlinear_pointwise``), CPU only;
  the fastest on x86 CPUs with VNNI/AMX (``benchmarks/bench_int_backend.py``).
- ``int_mm``: ``torch._int_mm`` (s8 x s8 -> s32) with exact zero-point corrections, CPU and CUDA.
- ``simulated``: the float simulation (dequantized weight, fake-quantized input), any device, any
  layout; the reference the integer kernels are tested against.

:func:`use_kernels` is the one explicit call: ``"auto"`` gives every layer the fastest kernel
that supports it on its device (``simulated`` for layouts the integer kernels do not handle); a
named kernel that does not support a layer is a ``ConfigError`` naming the layer, never a silent
fallback. Integer kernels keep one copy of the weight (``int_kernels.prepare_int_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError

AUTO = "auto"
LEGACY_NAMES = {"fake": "simulated", "int": AUTO}  # the former ``backend`` values


@dataclass(frozen=True)
class Kernel:
    name: str
    devices: tuple[str, ...]          # torch device types
    layouts: tuple[str, ...]          # weight layouts (quantizers.WEIGHT_LAYOUTS)
    max_abits: int                    # activations up to this many bits
    preference: int                   # lower: preferred by "auto"
    available: Callable[[], bool]     # whether this torch build has it
    summary: str
    exact_on: Callable[[torch.device], bool] = lambda device: True  # whether its products are exact there

    def problem(self, layer, device: torch.device) -> str | None:
        """Why this kernel cannot run ``layer`` on ``device`` (None: it can)."""
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {device.type}"
        if layer.layout not in self.layouts:
            return f"needs {' or '.join(self.layouts)} weights, the layer has {layer.layout!r}"
        if layer.abits > self.max_abits:
            return f"needs <= {self.max_abits}-bit activations, the layer has {layer.abits}"
        if not self.available():
            return "is not available (or not exact) with this torch build on this CPU"
        if not self.exact_on(device):
            return f"is not exact on this {device.type} (int8 products saturate without VNNI)"
        return None


def _onednn_available() -> bool:
    from .int_kernels import onednn_works

    return onednn_works()


def _int_mm_available() -> bool:
    return hasattr(torch, "_int_mm")


def _int_mm_exact(device: torch.device) -> bool:
    from .int_kernels import int_mm_exact_on_cpu

    return device.type != "cpu" or int_mm_exact_on_cpu()


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("onednn", ("cpu",), ("channel",), 8, 0, _onednn_available,
           "oneDNN u8 x s8 quantized linear (CPU)"),
    Kernel("int_mm", ("cpu", "cuda"), ("channel",), 8, 1, _int_mm_available,
           "torch._int_mm s8 x s8 -> s32 with zero-point corrections (CPU, CUDA)", _int_mm_exact),
    Kernel("simulated", ("cpu", "cuda", "mps", "xpu"), ("channel", "group", "reference32"), 16, 9,
           lambda: True, "float simulation (any device, any layout)"),
)}


def kernel_names() -> tuple[str, ...]:
    return (AUTO, *KERNELS)


def canonical(name: str | None) -> str:
    """A kernel name, with the former backend names ``fake``/``int`` mapped; None -> ``auto``."""
    name = AUTO if name is None else LEGACY_NAMES.get(name, name)
    if name not in kernel_names():
        raise ConfigError(f"unknown kernel {name!r}; choose one of {', '.join(kernel_names())}")
    return name


def _layer_device(layer) -> torch.device:
    for t in (layer.wscale, layer.bias):
        if t is not None:
            return t.device
    return torch.device("cpu")


def choose(layer, kernel: str = AUTO, device: torch.device | None = None) -> str:
    """The kernel ``layer`` gets for the request ``kernel`` (see the module docstring)."""
    kernel = canonical(kernel)
    device = _layer_device(layer) if device is None else torch.device(device)
    if kernel != AUTO:
        problem = KERNELS[kernel].problem(layer, device)
        if problem:
            raise ConfigError(f"kernel {kernel!r} cannot run this layer: it {problem}")
        return kernel
    for k in sorted(KERNELS.values(), key=lambda k: k.preference):
        if k.problem(layer, device) is None:
            return k.name
    raise ConfigError(f"no kernel runs a {layer.layout} W{layer.wbits}A{layer.abits} layer on {device}")


def use_kernels(model: nn.Module, kernel: str = AUTO, *, lora_limbs: int | None = None) -> dict[str, str]:
    """Gives every ``QuantLinear`` of ``model`` its kernel (prepared now); returns name -> kernel.

    ``lora_limbs`` (default: keep each layer's, ``int_kernels.DEFAULT_LORA_LIMBS`` unless set):
    how many int8 limbs of the LoRA down rows the integer kernels append to the weight (0: the
    down-projection runs apart in fp32; 3 matches it; 1 is plain int8, an approximation).
    Checks every layer before changing any, so an unsupported explicit choice changes nothing.
    """
    from .int_kernels import MAX_LORA_LIMBS
    from .linear import QuantLinear

    if lora_limbs is not None and (not isinstance(lora_limbs, int) or isinstance(lora_limbs, bool)
                                   or not 0 <= lora_limbs <= MAX_LORA_LIMBS):
        raise ConfigError(f"lora_limbs must be an integer in 0..{MAX_LORA_LIMBS}, got {lora_limbs!r}")

    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    chosen = {}
    for name, m in layers.items():
        try:
            chosen[name] = choose(m, kernel)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    for name, m in layers.items():
        if lora_limbs is not None:
            m.lora_limbs = lora_limbs
        m.set_kernel(chosen[name])
    return chosen
