"""Temporal-aggregated smoothing (TAS) factors, and folding them into the preceding layers.

    s_j(alpha) = max(a_j^alpha / w_j^(1 - alpha), 1e-4)       X' = X / s,  W' = W * s

``a_j`` is the channel's absolute maximum over all calibration steps, samples and tokens; ``w_j``
the column's absolute maximum of the weight. Folding (method.md section 7) makes the division by
``s`` free at inference. Where a factor goes is the model adapter's ``Fold``
(``model/adapters/base.py``); the fold kinds, all exact:

- modulation rows (``adaln_rows``, ``table_rows``): the layer reads ``LN(x) * (1 + sc) + sh``;
  the ``sh`` rows (weight and bias, or table rows) are divided by ``s``; the ``sc`` rows become
  ``W_sc / s`` with bias ``(b_sc + 1) / s - 1`` (table: ``(T_sc + 1) / s - 1``);
- previous rows (``prev_rows``): the layer reads something linear in some output rows of a
  preceding linear (the attention output is linear in V): divide those rows by ``s``;
- ``on_the_fly``: nothing linear precedes the layer (e.g. after GELU), so ``QuantLinear.smooth``
  divides its input at run time.
"""

from __future__ import annotations

import torch
from torch import nn

from .folds import record_output_fold

S_FLOOR = 1e-4
_TINY = 1e-8  # keeps a_j^alpha / w_j^(1-alpha) finite for all-zero channels


def tas_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing factors ``s(alpha)`` (float32, shape (in,))."""
    a = act_absmax.float().clamp(min=_TINY)
    w = w_absmax.float().clamp(min=_TINY)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=S_FLOOR)


# ----------------------------------------------------------------------------------------------
#                                     Modulation folds
# ----------------------------------------------------------------------------------------------


def _chunk_rows(total: int, num_chunks: int, chunk: int, width: int) -> slice:
    d = total // num_chunks
    if d * num_chunks != total:
        raise ValueError(f"{total} rows do not split into {num_chunks} modulation chunks")
    if width != d:
        raise ValueError(f"smoothing factor has {width} channels, the modulation chunks are {d} wide")
    return slice(chunk * d, (chunk + 1) * d)


@torch.no_grad()
def fold_into_modulation_linear(lin: nn.Linear, s: torch.Tensor, num_chunks: int, shift_chunk: int,
                                scale_chunk: int) -> None:
    """Divides a modulated input ``LN(x) * (1 + sc) + sh`` by ``s`` through the rows of the
    modulation linear ``lin`` whose output is ``num_chunks`` equal chunks (shift and scale at the
    given indices). A missing bias becomes a zero bias first."""
    rows_sh = _chunk_rows(lin.out_features, num_chunks, shift_chunk, s.numel())
    rows_sc = _chunk_rows(lin.out_features, num_chunks, scale_chunk, s.numel())
    s = s.to(lin.weight.dtype).to(lin.weight.device)
    lin.weight[rows_sh] /= s[:, None]
    lin.weight[rows_sc] /= s[:, None]
    if lin.bias is None:  # a missing bias is a zero bias: (0 + 1) / s - 1
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    lin.bias[rows_sh] /= s
    lin.bias[rows_sc] = (lin.bias[rows_sc] + 1) / s - 1


@torch.no_grad()
def fold_into_modulation_table(table: torch.Tensor, s: torch.Tensor, shift_chunk: int, scale_chunk: int,
                               chunk_dim: int = 0) -> None:
    """The same fold for a modulation table (shift/scale are slices ``chunk_dim`` of ``table``,
    each as wide as ``s`` on the last axis)."""
    if table.shape[-1] != s.numel():
        raise ValueError(f"smoothing factor has {s.numel()} channels, the table is {table.shape[-1]} wide")
    s = s.to(table.dtype).to(table.device)
    sh = table.select(chunk_dim, shift_chunk)
    sc = table.select(chunk_dim, scale_chunk)
    sh /= s
    sc.copy_((sc + 1) / s - 1)


# ----------------------------------------------------------------------------------------------
#                                  Folds into previous rows
# ----------------------------------------------------------------------------------------------


def row_slice(out_features: int, rows: tuple[int, int] | None) -> slice:
    return slice(0, out_features) if rows is None else slice(rows[0], rows[1])


@torch.no_grad()
def fold_weight_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, rows: slice
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copies of a weight and bias with the output ``rows`` divided by ``s``."""
    weight = weight.detach().clone().float()
    weight[rows] /= s[:, None]
    if bias is not None:
        bias = bias.detach().clone().float()
        bias[rows] /= s
    return weight, bias


@torch.no_grad()
def fold_into_rows(lin: nn.Module, s: torch.Tensor, rows: slice) -> None:
    """Divides the output ``rows`` of ``lin`` by ``s``: the weight and bias of a float
    ``nn.Linear``, or for a ``QuantLinear`` with per-row scales (``channel``/``group`` layouts) the
    row scales, the bias and the rows of the LoRA up factor; codes stay on their grid, so this is
    exact too."""
    if isinstance(lin, nn.Linear):
        lin.weight[rows] /= s[:, None]
        if lin.bias is not None:
            lin.bias[rows] /= s
        return
    fmt = getattr(lin, "weight_format", None)
    layout = None if fmt is None else fmt.layout
    if layout not in ("channel", "group"):
        raise TypeError(f"cannot fold into the rows of a {type(lin).__name__} with layout {layout!r}: "
                        "its scale groups span rows (fold before quantizing)")
    lin.wscale[rows] /= s[:, None]
    if lin.bias is not None:
        lin.bias[rows] /= s
    if lin.lora_up is not None:
        lin.lora_up[rows] /= s[:, None]
    lin.invalidate()


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


@torch.no_grad()
def apply_fold(model: nn.Module, fold, s: torch.Tensor) -> None:
    """Makes the division by ``s`` free as the adapter's ``Fold`` says (not ``on_the_fly``), and
    records on a target linear which output rows now change by ``1 / s`` (``folds``: the shift rows
    ``sh / s`` and the scale rows ``(sc + 1) / s - 1`` alike)."""
    if fold.kind == "adaln_rows":
        lin = model.get_submodule(fold.target)
        fold_into_modulation_linear(lin, s, fold.num_chunks, fold.shift_chunk, fold.scale_chunk)
        for chunk in (fold.shift_chunk, fold.scale_chunk):
            record_output_fold(lin, s, _chunk_rows(lin.out_features, fold.num_chunks, chunk, s.numel()))
    elif fold.kind == "table_rows":
        fold_into_modulation_table(model.get_parameter(fold.target), s, fold.shift_chunk, fold.scale_chunk,
                                   fold.chunk_dim)
    elif fold.kind == "prev_rows":
        lin = model.get_submodule(fold.target)
        fold_into_rows(lin, s, row_slice(lin.out_features, fold.rows))
        record_output_fold(lin, s, row_slice(lin.out_features, fold.rows))
    else:
        raise ValueError(f"a {fold.kind} smoothing factor has nothing to fold into")
