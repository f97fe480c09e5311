"""Hadamard rotation of a linear's input (QuaRot-style), applied online as a fast Walsh-Hadamard transform.

For an orthogonal ``H`` (``H H^T = I``), ``x W^T = (x H^T) (W H^T)^T``: rotating the input and the
weight's columns by the same ``H`` leaves the float function unchanged, while spreading each
channel's outliers over the whole block, which makes the rotated activations (and weights) far
easier to quantize at 4 bits. Combined with smoothing, the layer reads ``z = (x / s) H^T`` and
holds ``(W s) H^T``.

``H`` here is the normalised Sylvester Hadamard matrix of size ``block`` (symmetric, so
``x H^T = x H``), repeated block-diagonally over the width: ``block`` is the largest power of two
dividing the width (the width itself when it is a power of two; 64 for 192, 256 for 768). The
transform costs ``width * (2 * 32 + log2(block / 32))`` operations per token (``fwht``: a product
with a 32 x 32 Hadamard matrix, then butterfly stages), no ``block x block`` matrix.
"""

from __future__ import annotations

import torch

ROTATIONS = ("none", "hadamard", "search")  # SmoothingSpec.rotation: never, always, or the search's choice


def hadamard_block(width: int) -> int:
    """The largest power of two dividing ``width`` (the block of the block-diagonal Hadamard)."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return width & -width


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size ``n`` (a power of two), explicitly (tests)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype)


DENSE_BLOCK = 32  # fwht: the first log2(32) butterfly stages as one product with H_32 (see fwht)


_DENSE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}  # memo of _dense_hadamard (constants)


def _dense_hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised Hadamard matrix of size ``n`` (small: n <= DENSE_BLOCK) in ``dtype`` on
    ``device``, built once per (size, dtype, device): ``fwht`` runs in every rotated layer's
    forward, where building it took a fifth of the transform (65 of 297 us at 512 x 192), and
    the matrix is a constant (read only). A plain dict, not ``functools.cache``: torch.compile
    warns on a cache wrapper in a traced function."""
    key = (n, dtype, device)
    if key not in _DENSE:
        _DENSE[key] = hadamard_matrix(n, dtype).to(device)
    return _DENSE[key]


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x H^T`` along the last axis, ``H`` block-diagonal with normalised Hadamard blocks of size
    ``block`` (a power of two dividing the width); a new tensor, fp32 at least inside.

    Sylvester's ``H_block = H_(block/d) (x) H_d``: the inner factor (``d = min(block, DENSE_BLOCK)``)
    is one product with the explicit ``H_d`` over contiguous rows of ``d``; the outer one is
    log2(block/d) butterfly stages whose pairs are runs of at least ``d`` contiguous values. The
    early butterfly stages (pairs 1, 2, 4 ... apart) are the slow, strided ones: the product
    replaces them (``benchmarks/bench_int_backend.py --mode w4a4`` times the layers with it)."""
    width = x.shape[-1]
    if block < 1 or block & (block - 1) or width % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing the width {width}")
    lead = x.shape[:-1]
    d = min(block, DENSE_BLOCK)
    work = torch.promote_types(x.dtype, torch.float32)
    y = x.reshape(-1, d).to(work) @ _dense_hadamard(d, work, x.device)
    y = y.view(-1, width)
    if block > d:
        tracked = y.requires_grad and torch.is_grad_enabled()  # autograd refuses out=: new tensors instead
        buf = None if tracked else torch.empty_like(y)
        h = d
        while h < block:  # stage: runs (i, i + h) inside every 2h-run -> (a + b, a - b), ping-ponging buffers
            a = y.view(-1, block // (2 * h), 2, h)
            if tracked:
                y = torch.stack((a[:, :, 0] + a[:, :, 1], a[:, :, 0] - a[:, :, 1]), dim=2).view(-1, width)
            else:
                o = buf.view(-1, block // (2 * h), 2, h)
                torch.add(a[:, :, 0], a[:, :, 1], out=o[:, :, 0])
                torch.sub(a[:, :, 0], a[:, :, 1], out=o[:, :, 1])
                y, buf = buf, y
            h *= 2
        y = y * (block // d) ** -0.5 if tracked else y.mul_((block // d) ** -0.5)
    return y.reshape(*lead, width).to(x.dtype)


def rotate_weight(w: torch.Tensor, block: int) -> torch.Tensor:
    """``W H^T``: the weight that reads the rotated input (each row transformed like an input)."""
    return fwht(w, block)


def rotate_second_moment(h: torch.Tensor, block: int) -> torch.Tensor:
    """``H_r = R H R^T`` for inputs rotated as ``x R^T``: the second moment of the rotated inputs."""
    return fwht(fwht(h, block).T, block).T
