"""GPTQ-style error-compensated rounding of a weight (Frantar et al. 2022), data-free in the DiTAS sense.

Round-to-nearest minimises ``||W - Q||`` element by element; GPTQ minimises the output error on
the layer's inputs, ``||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T)`` with ``H = sum x x^T`` the
second moment of the recorded calibration inputs (``LayerInputs.xs``: the FP model's own inputs,
so nothing but the model is needed). Columns are rounded one at a time and the rounding error of
each is spread over the columns not yet rounded through the inverse Hessian's Cholesky factor,
in blocks of ``BLOCK`` columns (lazy batch updates).

The scales and zero points are those of round-to-nearest on the weight as given (min/max of each
group, fixed before any column is rounded: "static groups"), so every layout of
``quantizers.WEIGHT_LAYOUTS`` works unchanged (a group's scale is looked up per element) and the
codes stay in ``[0, 2^b - 1]`` (clamped); only which code each weight gets changes. FP4 weights
(``fp4.py``) work the same way: round-to-nearest's block scales are kept, and each column is
rounded to the E2M1 grid (saturating at 6) times its block's scale.
"""

from __future__ import annotations

import torch

from .fp4 import FP4_BLOCKS, block_size, dequantize_fp4, e2m1_codes, e2m1_round, quantize_fp4
from .quantizers import _grouped, _ungrouped, _weight_codes

BLOCK = 128          # columns per lazy update
DAMP = 0.01          # damping: this fraction of the mean of H's diagonal is added to it
GPTQ_ORDERS = ("natural", "desc")  # column order: as stored, or by descending diag(H) ("act order")


def second_moment(xs: list[torch.Tensor]) -> torch.Tensor:
    """``H = sum_t X_t^T X_t`` (in, in) over the recorded steps, in float64 (summed over many tokens)."""
    h = None
    for x in xs:
        x = x.double()
        h = x.T @ x if h is None else h.addmm_(x.T, x)
    assert h is not None, "no recorded inputs"
    return h


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` after damping (``DAMP`` of the mean diagonal); the damping
    is raised tenfold until the factorisation succeeds (a rank-deficient H from few tokens)."""
    n = h.shape[0]
    damp = DAMP * float(h.diagonal().mean().clamp(min=1e-12))
    eye = torch.eye(n, dtype=h.dtype)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
        damp *= 10
    raise ValueError("GPTQ: the inputs' second moment is not positive definite even after damping")


def _elementwise_qparams(w: torch.Tensor, bits: int, layout: str, group_size: int, range_mode: str):
    """Round-to-nearest scales and zero points of ``w``, in the layout's shape and spread per element."""
    _, scale, zero = _weight_codes(w, bits, layout, group_size, range_mode)
    g = _grouped(w.float(), layout, group_size)
    full_s = _ungrouped(scale[..., None].expand_as(g), layout, w.shape)
    full_z = _ungrouped(zero[..., None].expand_as(g), layout, w.shape)
    return scale, zero, full_s, full_z


class _IntGrid:
    """The INT grid of a weight layout: round-to-nearest's scales and zero points, per element."""

    def __init__(self, w: torch.Tensor, bits: int, layout: str, group_size: int, range_mode: str):
        self.scale, self.zero, self.full_s, self.full_z = _elementwise_qparams(w, bits, layout, group_size, range_mode)
        self.top = 2 ** bits - 1

    def round(self, col: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(code, dequantized value) of one column ``col`` with its per-row scale ``s`` / zero ``z``."""
        q = torch.clamp(torch.round(col / s) + z, 0, self.top)
        return q, (q - z) * s

    def finish(self, codes: torch.Tensor):
        return (codes.to(torch.uint8), self.scale, self.zero), (codes - self.full_z) * self.full_s


class _Fp4Grid:
    """An FP4 block format's grid (``fp4.py``): round-to-nearest's block scales (times NVFP4's tensor
    scale), per element; a column's values are E2M1 values times their block's scale. The
    "codes" carried through the loop are the E2M1 values themselves (exact floats), encoded at the end."""

    def __init__(self, w: torch.Tensor, fmt: str):
        _, self.scale, self.tensor_scale = quantize_fp4(w, fmt)
        full = self.scale if self.tensor_scale is None else self.scale * self.tensor_scale
        self.full_s = full.repeat_interleave(block_size(fmt), dim=-1)  # (out, in): the element's scale
        self.full_z = torch.zeros_like(self.full_s)

    def round(self, col: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = e2m1_round(col / s)
        return r, r * s

    def finish(self, values: torch.Tensor):
        codes = e2m1_codes(values)
        return (codes, self.scale, self.tensor_scale), dequantize_fp4(codes, self.scale, self.tensor_scale)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, layout: str = "channel", group_size: int = 0,
                  range_mode: str = "levels", order: str = "natural", fmt: str = "int"
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """GPTQ rounding of the (out, in) weight ``w`` for inputs whose second moment is ``h`` (in, in).

    ``fmt``: ``int`` (``bits``, ``layout``, ``group_size``, ``range_mode`` as
    ``quantizers.quantize_weight``) or an FP4 block format (``nvfp4``/``mxfp4``: its blocks and
    scales, the INT arguments unused). Returns ``((codes uint8 (out, in), scale, third), dequantized)``
    in the shapes of the format's round-to-nearest quantizer (``quantizers.weight_quantizer``),
    which it replaces.
    """
    if order not in GPTQ_ORDERS:
        raise ValueError(f"GPTQ column order must be one of {GPTQ_ORDERS}, got {order!r}")
    w = w.float()
    out_f, in_f = w.shape
    grid = _Fp4Grid(w, fmt) if fmt in FP4_BLOCKS else _IntGrid(w, bits, layout, group_size, range_mode)
    h = h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # a channel never seen: its weight does not matter, plain rounding
    perm = torch.argsort(h.diagonal(), descending=True) if order == "desc" else torch.arange(in_f)
    u = _inverse_cholesky(h[perm][:, perm]).float()
    work, s_p, z_p = w[:, perm].clone(), grid.full_s[:, perm], grid.full_z[:, perm]
    codes = torch.empty_like(work)
    for i1 in range(0, in_f, BLOCK):
        i2 = min(i1 + BLOCK, in_f)
        blk = work[:, i1:i2]  # a view: updates land in ``work``
        err = torch.empty(out_f, i2 - i1)
        for i in range(i2 - i1):
            j = i1 + i
            col = blk[:, i]
            codes[:, j], value = grid.round(col, s_p[:, j], z_p[:, j])
            e = (col - value) / u[j, j]
            blk[:, i:].sub_(e[:, None] * u[j, j:i2][None, :])
            err[:, i] = e
        work[:, i2:].sub_(err @ u[i1:i2, i2:])
    return grid.finish(codes[:, torch.argsort(perm)])
