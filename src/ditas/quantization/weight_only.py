"""Weight-only 8-bit storage for the adaLN modulation linears.

The DiTAS method leaves the adaLN modulation layers (for DiT ``blocks[i].adaLN_modulation[1]`` and
``final_layer.adaLN_modulation[1]``, about a third of DiT-XL/2's weights; the model's adapter
names them) unquantized. They only
see the conditioning vector (one row per sample), so their cost is reading the weight, not
arithmetic: storing it as int8 cuts both the checkpoint and the memory traffic by 4x.

``WeightOnlyInt8Linear`` keeps ``qweight`` int8 (out, in) with a symmetric per-output-channel
``wscale`` (out, 1): ``W ~ qweight * wscale``. The forward multiplies the input, cast to bf16,
by the int8 weight in ``torch._weight_int8pack_mm`` (no dequantized copy of the weight; on this
CPU it is faster than the fp32 ``nn.Linear`` it replaces, see ``docs/performance.md``), then
applies ``wscale`` and the bias in fp32. ``compute="fp32"`` instead dequantizes on the fly and
runs an fp32 matmul (slower, no bf16 rounding of inputs and outputs).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dtypes import device_only

__all__ = ["WeightOnlyInt8Linear", "quantize_weight_only", "quantize_adaln_weight_only", "adaln_linear_names"]

Compute = Literal["bf16", "fp32"]
_K_MULTIPLE = 16


class WeightOnlyInt8Linear(nn.Module):
    """Linear layer with an int8 per-output-channel symmetric weight and float activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute: Compute = "bf16"):
        super().__init__()
        if compute not in ("bf16", "fp32"):
            raise ValueError(f"compute must be 'bf16' or 'fp32', got {compute!r}")
        self.in_features, self.out_features = in_features, out_features
        self.compute: Compute = compute
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscale", torch.ones(out_features, 1))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel_args: tuple[torch.Tensor, torch.Tensor] | None = None  # (int8 weight, ones), K padded

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute: Compute = "bf16") -> "WeightOnlyInt8Linear":
        """Round-to-nearest ``qweight = round(W / s)`` with ``s = max|W_row| / 127`` per output row."""
        w = linear.weight.detach().float()
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, compute=compute)
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        m.qweight.copy_(torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8))
        m.wscale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.wscale

    def invalidate(self) -> None:
        """Call after changing ``qweight`` in place: drops the cached kernel operands."""
        self._kernel_args = None

    def _apply(self, fn, recurse=True):
        """Moves the layer; never casts it (``ditas.dtypes.device_only``): int8 codes, fp32 scales
        and bias, whatever dtype the model around it computes in."""
        self.invalidate()
        return super()._apply(device_only(fn), recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def _kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        # torch._weight_int8pack_mm crashes (segfault) on CPU unless K is a multiple of 16:
        # zero-pad the weight once here and the input on every call.
        if self._kernel_args is None:
            pad = -self.in_features % _K_MULTIPLE
            w = F.pad(self.qweight, (0, pad)) if pad else self.qweight
            ones = torch.ones(self.out_features, dtype=torch.bfloat16, device=self.qweight.device)
            self._kernel_args = (w.contiguous(), ones)
        return self._kernel_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.compute == "fp32":
            y = F.linear(x2.float(), self.dequantized_weight(), self.bias)
        else:
            w, ones = self._kernel_operands()
            xb = x2.to(torch.bfloat16)
            if w.shape[1] != self.in_features:
                xb = F.pad(xb, (0, w.shape[1] - self.in_features))
            y = torch._weight_int8pack_mm(xb.contiguous(), w, ones).float()
            y = y.mul_(self.wscale.reshape(1, -1))
            if self.bias is not None:
                y = y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"W8 per-channel symmetric weight-only, A{'bf16' if self.compute == 'bf16' else 'fp32'}")


def adaln_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's weight-only layers (its adapter's adaLN modulation linears)."""
    from ..errors import ConfigError
    from ..model.adapters.registry import adapter_for

    try:
        return adapter_for(model).weight_only_linears()
    except ConfigError:  # not a model family ditas knows: no adaLN layers ditas knows of
        return []


def quantize_weight_only(model: nn.Module, names: list[str], compute: Compute = "bf16") -> list[str]:
    """Replaces the linears ``names`` by ``WeightOnlyInt8Linear`` in place.

    Layers already converted are left alone; returns the names converted. Raises ``ValueError`` if
    one is neither ``nn.Linear`` nor converted.
    """
    converted = []
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, WeightOnlyInt8Linear):
            continue
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__}, expected nn.Linear")
        model.set_submodule(name, WeightOnlyInt8Linear.from_linear(layer, compute=compute))
        converted.append(name)
    return converted


def quantize_adaln_weight_only(model: nn.Module, compute: Compute = "bf16") -> list[str]:
    """Stores every adaLN modulation ``nn.Linear`` of the model (as its adapter names them) as a
    ``WeightOnlyInt8Linear``, in place. Raises ``ValueError`` if the model has none."""
    names = adaln_linear_names(model)
    if not names:
        raise ValueError("the model has no adaLN modulation layers (expected a model family ditas knows)")
    return quantize_weight_only(model, names, compute)
