"""Low-rank outlier absorption in SVDQuant's order, beside ditas' training-free LoRA.

Two orders give a layer its one 16-bit low-rank branch (the same ``lora_down``/``lora_up`` tensors,
so checkpoints and kernels need nothing new):

- ``quantize_first`` (ditas, ``lora.training_free_lora``): quantize, fit the branch to the weight
  error, re-quantize what the branch does not carry, ``rounds`` times;
- ``svd_first`` (SVDQuant, Li et al. 2024): after smoothing, split the weight into its top-r SVD
  part and a residual, ``W_s = L1 L2 + R``, and quantize only ``R``. The branch carries the
  weight's largest directions (where smoothing piled the activation outliers), the 4-bit grid
  only the flatter residual.
"""

from __future__ import annotations

import torch

from .lora import LoraFit, WeightQuantizer, low_rank, resolve_svd, training_free_lora


def low_rank_split(ws: torch.Tensor, rank: int, svd: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L1, L2, R)`` with ``L1 L2`` the best rank-``rank`` part of ``ws`` and ``R = ws - L1 L2``:
    before quantization the split is exact (``L1 L2 + R == ws`` to float rounding)."""
    ws = ws.float()
    up, down, _ = low_rank(ws, rank, resolve_svd(svd, tuple(ws.shape)))
    return up, down, ws - up @ down


def svd_first_lora(ws: torch.Tensor, quantizer: WeightQuantizer, rank: int, svd: str = "auto") -> LoraFit:
    """SVDQuant's order: the top-r SVD of ``ws`` is the branch; the residual is quantized (one round)."""
    if rank <= 0:
        return training_free_lora(ws, quantizer, 0)
    up, down, resid = low_rank_split(ws, rank, svd)
    codes, deq = quantizer(resid)
    err = float(torch.linalg.norm(resid - deq))  # = ||ws - (deq + up down)||
    return LoraFit(codes, deq, up, down, [err], 0)


def fit_branch(ws: torch.Tensor, quantizer: WeightQuantizer, rank: int, rounds: int, keep: str, svd: str,
               order: str) -> LoraFit:
    """The layer's codes and low-rank branch in ``order`` (``quantize_first`` or ``svd_first``)."""
    if order == "svd_first":
        return svd_first_lora(ws, quantizer, rank, svd)
    if order != "quantize_first":
        raise ValueError(f"unknown low-rank order {order!r}")
    return training_free_lora(ws, quantizer, rank, rounds, keep, svd)
