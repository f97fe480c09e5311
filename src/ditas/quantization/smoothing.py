"""Temporal-aggregated smoothing (TAS) factors, and folding them into the preceding layers.

    s_j(alpha) = max(a_j^alpha / w_j^(1 - alpha), 1e-4)       X' = X / s,  W' = W * s

``a_j`` is the channel's absolute maximum over all calibration steps, samples and tokens; ``w_j``
the column's absolute maximum of the weight. Folding (method.md section 7) makes the division by
``s`` free at inference:

- ``qkv`` / ``fc1`` read ``LN(x) * (1 + sc) + sh``: the adaLN ``sh`` rows (weight and bias) are
  divided by ``s``; the ``sc`` rows become ``W_sc / s`` with bias ``(b_sc + 1) / s - 1``;
- ``proj`` reads the attention output, linear in V: divide the V rows of ``qkv`` by ``s``;
- ``fc2`` reads ``GELU(fc1(..))``: nothing linear precedes it, so ``QuantLinear.smooth`` divides
  its input on the fly.
"""

from __future__ import annotations

import torch
from torch import nn

S_FLOOR = 1e-4
_TINY = 1e-8  # keeps a_j^alpha / w_j^(1-alpha) finite for all-zero channels


def tas_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing factors ``s(alpha)`` (float32, shape (in,))."""
    a = act_absmax.float().clamp(min=_TINY)
    w = w_absmax.float().clamp(min=_TINY)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=S_FLOOR)


# adaLN chunk indices of the modulation read by each role: (shift, scale)
ADALN_CHUNKS = {"qkv": (0, 1), "fc1": (3, 4)}


def adaln_linear(block: nn.Module) -> nn.Linear:
    """The block's adaLN linear (the last ``nn.Linear`` of ``adaLN_modulation``)."""
    linears = [m for m in block.adaLN_modulation.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the block has no adaLN linear to fold smoothing into")
    return linears[-1]


@torch.no_grad()
def fold_into_adaln(block: nn.Module, role: str, s: torch.Tensor) -> None:
    """Divides the modulated input of ``role`` (``qkv`` or ``fc1``) by ``s`` through adaLN rows."""
    lin = adaln_linear(block)
    d = lin.out_features // 6
    if s.numel() != d:
        raise ValueError(f"smoothing factor has {s.numel()} channels, the block is {d} wide")
    sh, sc = ADALN_CHUNKS[role]
    s = s.to(lin.weight.dtype)
    rows_sh = slice(sh * d, (sh + 1) * d)
    rows_sc = slice(sc * d, (sc + 1) * d)
    lin.weight[rows_sh] /= s[:, None]
    lin.weight[rows_sc] /= s[:, None]
    if lin.bias is not None:
        lin.bias[rows_sh] /= s
        lin.bias[rows_sc] = (lin.bias[rows_sc] + 1) / s - 1
    else:  # a missing bias is a zero bias: (0 + 1) / s - 1
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
        lin.bias[rows_sc] = 1 / s - 1


def v_rows(out_features: int) -> slice:
    """Rows of the fused ``qkv`` weight that produce V (the last third)."""
    d = out_features // 3
    return slice(2 * d, 3 * d)


@torch.no_grad()
def fold_weight_v_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copies of a ``qkv`` weight and bias with the V rows divided by ``s`` (``proj``'s factor)."""
    weight = weight.detach().clone().float()
    rows = v_rows(weight.shape[0])
    weight[rows] /= s[:, None]
    if bias is not None:
        bias = bias.detach().clone().float()
        bias[rows] /= s
    return weight, bias


@torch.no_grad()
def fold_into_v_rows(qkv: nn.Module, s: torch.Tensor) -> None:
    """Divides the V rows of ``qkv`` by ``s``: the weight and bias of a float ``nn.Linear``, or for a
    ``QuantLinear`` with per-row scales (``channel``/``group`` layouts) the row scales, the bias and
    the V rows of the LoRA up factor; codes stay on their grid, so this is exact too."""
    rows = v_rows(qkv.out_features)
    if isinstance(qkv, nn.Linear):
        qkv.weight[rows] /= s[:, None]
        if qkv.bias is not None:
            qkv.bias[rows] /= s
        return
    layout = getattr(qkv, "layout", None)
    if layout not in ("channel", "group"):
        raise TypeError(f"cannot fold into the V rows of a {type(qkv).__name__} with layout {layout!r}: "
                        "its scale groups span rows (fold before quantizing)")
    qkv.wscale[rows] /= s[:, None]
    if qkv.bias is not None:
        qkv.bias[rows] /= s
    if qkv.lora_up is not None:
        qkv.lora_up[rows] /= s[:, None]
    qkv.invalidate()


class OnTheFlySmooth(nn.Module):
    """Wraps a linear so that it computes ``linear(x / s)`` with the weight scaled by ``s``:
    the *unfolded* smoothed layer (used to check folding, and by tests)."""

    def __init__(self, linear: nn.Linear, s: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight * s[None, :])
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)
        self.register_buffer("s", s.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x / self.s)
