"""The kernels of ``QuantLinear``: one registry of entries, each owning its code.

A kernel computes ``QuantLinear``'s product; each is one :class:`~.base.Kernel` subclass in its own
module here, which declares what it supports (devices, weight layouts, bits, activation
granularities, whether this torch build has it) and holds ``prepare(layer)`` and
``forward(layer, x)``:

- ``onednn`` (``onednn.py``): oneDNN's u8 x s8 quantized linear, CPU only; the fastest on x86 CPUs
  with VNNI/AMX (``benchmarks/bench_int_backend.py``).
- ``int_mm`` (``int_mm.py``): ``torch._int_mm`` (s8 x s8 -> s32) with exact zero-point
  corrections, CPU and CUDA.
- ``simulated`` (``simulated.py``): the float simulation, any device, any layout; the reference.

The integer products are custom ops (``ops.py``, namespace ``ditas::``), so that ``torch.compile``
and ``torch.export`` trace a quantized model.

The one vocabulary is ``kernel``, with the values ``auto`` and the entry names. :func:`use_kernels`
is the one explicit call: ``"auto"`` (the default everywhere) gives every layer the most preferred
kernel that supports it on its device; a named kernel that does not support a layer is a
``ConfigError`` naming the layer, never a silent fallback. Adding a kernel: a new module with its
entry, listed in ``_ENTRIES``.
"""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from .base import Kernel, layer_device
from .int_mm import IntMM
from .integer import MAX_LORA_LIMBS
from .onednn import OneDNN
from . import ops  # noqa: F401  registers the ditas:: custom ops the kernels call
from .simulated import Simulated

AUTO = "auto"
_ENTRIES: tuple[Kernel, ...] = (OneDNN(), IntMM(), Simulated())
KERNELS: dict[str, Kernel] = {k.name: k for k in _ENTRIES}
_FORMER_NAMES = {"fake": "simulated", "int": AUTO}  # only to say what a former name is called now


def kernel_names() -> tuple[str, ...]:
    """What a user may ask for (the CLI's choices): ``auto`` and every entry's name."""
    return (AUTO, *KERNELS)


def canonical(name: str | None) -> str:
    """A requested kernel name (None -> ``auto``), checked against the registry."""
    name = AUTO if name is None else name
    if name not in kernel_names():
        hint = f" (now called {_FORMER_NAMES[name]!r})" if name in _FORMER_NAMES else ""
        raise ConfigError(f"unknown kernel {name!r}{hint}; choose one of {', '.join(kernel_names())}")
    return name


def choose(layer, kernel: str = AUTO, device=None) -> str:
    """The kernel ``layer`` gets for the request ``kernel`` (see the module docstring)."""
    kernel = canonical(kernel)
    if kernel != AUTO:
        problem = KERNELS[kernel].supports(layer, device)
        if problem:
            raise ConfigError(f"kernel {kernel!r} cannot run this layer: it {problem}")
        return kernel
    reasons = []
    for k in sorted(_ENTRIES, key=lambda k: k.preference):
        problem = k.supports(layer, device)
        if problem is None:
            return k.name
        reasons.append(f"{k.name} {problem}")
    where = layer_device(layer) if device is None else device
    raise ConfigError(f"no kernel runs this {layer.precision()} layer on {where}: "
                      + "; ".join(reasons))


def use_kernels(model: nn.Module, kernel: str = AUTO, *, lora_limbs: int | None = None) -> dict[str, str]:
    """Gives every ``QuantLinear`` of ``model`` its kernel (prepared now); returns name -> kernel.

    ``lora_limbs`` (default: keep each layer's, ``integer.DEFAULT_LORA_LIMBS`` unless set): how many
    int8 limbs of the LoRA down rows the integer kernels append to the weight (0: the
    down-projection runs apart in fp32; 3 matches it; 1 is plain int8, an approximation).
    Checks every layer before changing any, so an unsupported explicit choice changes nothing.
    """
    if lora_limbs is not None and (not isinstance(lora_limbs, int) or isinstance(lora_limbs, bool)
                                   or not 0 <= lora_limbs <= MAX_LORA_LIMBS):
        raise ConfigError(f"lora_limbs must be an integer in 0..{MAX_LORA_LIMBS}, got {lora_limbs!r}")
    # the layers that take a kernel (QuantLinear; named by what it does, so that kernels/ need
    # not import linear.py, which imports kernels/)
    layers = {name: m for name, m in model.named_modules() if callable(getattr(type(m), "set_kernel", None))}
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


__all__ = ["AUTO", "KERNELS", "Kernel", "add_kernel_argument", "canonical", "choose", "kernel_names", "use_kernels"]


def add_kernel_argument(parser, what: str = "the quantized layers") -> None:
    """The ``--kernel`` option of every command that runs quantized layers: choices from the registry,
    default ``auto`` (the same in every command and in the API)."""
    parser.add_argument("--kernel", default=AUTO, choices=kernel_names(),
                        help=f"kernel of {what} (default auto: the most preferred one that supports each "
                             "layer on --device; " + "; ".join(f"{k.name}: {k.summary}" for k in _ENTRIES) + ")")
