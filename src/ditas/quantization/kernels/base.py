"""What a kernel of ``QuantLinear`` is: one object that says what it supports and owns its code.

A kernel computes ``QuantLinear``'s function ``y = Q_A(x / smooth) (W_q + up @ down)^T + bias``.
Each kernel is one subclass of :class:`Kernel` in its own module of this package, registered in
``kernels/__init__.py``; ``QuantLinear`` only calls :meth:`Kernel.prepare` and
:meth:`Kernel.forward` of the kernel it was given, so adding a kernel is one new file (and its tests).
"""

from __future__ import annotations

from typing import Any

import torch

from ...validate import quant_params_problem


class Kernel:
    """One kernel: its support (class attributes), its preparation and its forward.

    ``preference``: lower is preferred by ``"auto"``. ``holds_codes``: the prepared state keeps the
    weight codes (it has ``codes()``), so the layer drops its own ``qweight`` (one copy of the weight).
    """

    name: str = ""
    summary: str = ""
    devices: tuple[str, ...] = ()       # torch device types
    layouts: tuple[str, ...] = ()       # weight layouts (quantizers.WEIGHT_LAYOUTS)
    wbits: tuple[int, int] = (2, 8)     # weight bits, inclusive range
    max_abits: int = 8                  # activations up to this many bits
    act_granularities: tuple[str, ...] = ("tensor", "token")
    formats: tuple[str, ...] = ("int",)  # number formats of weights and activations (quantizers.FORMATS)
    preference: int = 100
    holds_codes: bool = False

    def available(self) -> bool:
        """Whether this torch build has the kernel (checked lazily: some checks run a product)."""
        return True

    def exact_on(self, device: torch.device) -> bool:
        """Whether its products are exact on ``device`` (integer kernels: int8 products saturate on
        CPUs without VNNI, where oneDNN sums pairs of u8 x s8 products in int16)."""
        return True

    def supports(self, layer: Any, device: torch.device | str | None = None) -> str | None:
        """Why this kernel cannot run ``layer`` on ``device`` (default: the layer's); None: it can."""
        device = layer_device(layer) if device is None else torch.device(device)
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {device.type}"
        w = layer.weight_format
        if w.format not in self.formats:
            return f"needs {' or '.join(f.upper() for f in self.formats)} weights, the layer has {w.format} weights"
        if w.layout not in self.layouts:
            return f"needs {' or '.join(self.layouts)} weights, the layer has {w.layout!r}"
        if not self.wbits[0] <= w.bits <= self.wbits[1]:
            return f"needs {self.wbits[0]}..{self.wbits[1]}-bit weights, the layer has {w.bits}"
        for a in layer.activation_formats():  # a layer with late-step activations runs both on one kernel
            problem = self._activation_problem(a)
            if problem:
                return problem
        if not self.available():
            return "is not available (or not exact) with this torch build on this CPU"
        if not self.exact_on(device):
            return f"is not exact on this {device.type} (int8 products saturate without VNNI)"
        return weights_problem(layer)

    def _activation_problem(self, a: Any) -> str | None:
        fmt = a.format if a.bits < 16 else "int"
        if fmt not in self.formats:
            return f"needs {' or '.join(f.upper() for f in self.formats)} activations, the layer has {fmt} activations"
        if a.bits > self.max_abits:
            return f"needs <= {self.max_abits}-bit activations, the layer has {a.bits}"
        if a.bits < 16 and a.granularity not in self.act_granularities:
            return f"needs per-{' or per-'.join(self.act_granularities)} activations, the layer has per-{a.granularity}"
        return None

    def prepare(self, layer: Any) -> Any:
        """The kernel's state for ``layer`` (held by the layer as ``kernel_state``, not saved)."""
        raise NotImplementedError

    def forward(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x`` (any leading shape, the layer's input dtype)."""
        raise NotImplementedError

    def describe(self, layer: Any) -> list[str]:
        """Extra parts of the layer's ``repr`` that this kernel decides."""
        return []

    def __repr__(self) -> str:
        return f"<kernel {self.name}: {self.summary}>"


def cached(state: Any, attr: str, make) -> torch.Tensor:
    """``state.attr``, made by ``make()`` and kept at the first eager call. While torch.compile or
    torch.export traces, a missing value is made in the graph and NOT kept: the tracer's tensors
    (fake tensors) must not leak into the eager state."""
    value = getattr(state, attr)
    if value is None:
        value = make()
        if not torch.compiler.is_compiling():
            setattr(state, attr, value)
    return value


def layer_device(layer: Any) -> torch.device:
    """The device of a layer's tensors (its scales; CPU for a layer without any)."""
    for t in (layer.wscale, layer.bias):
        if t is not None:
            return t.device
    return torch.device("cpu")


def weights_problem(layer: Any) -> str | None:
    """Scales / zero points that would give garbage on some kernel (``validate.quant_params_problem``)."""
    if layer.wscale.is_meta:
        return None
    problem = quant_params_problem(layer.wscale, layer.wzero)
    return None if problem is None else f"cannot run weights whose wscale/wzero {problem}"
