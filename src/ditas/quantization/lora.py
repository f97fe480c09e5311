"""Training-free LoRA: alternating quantization and rank-r SVD of the weight's residual.

    L R = 0
    repeat T times:
        Q   = Q_W(W - L R)
        L R = best rank-r approximation of (W - Q)      # L = U sqrt(S), R = sqrt(S) V^T

No data and no gradient: only the weight. The error ``||W - Q - L R||`` does not fall
monotonically, so the ``best`` round can be kept (ours) or the ``last`` (the reference code).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# a weight quantizer: float (out, in) -> (codes, scale, zero) and the dequantized weight
WeightQuantizer = Callable[[torch.Tensor], tuple[Codes, torch.Tensor]]


@dataclass
class LoraFit:
    codes: Codes            # (qweight, wscale, wzero) of the kept round
    dequant: torch.Tensor   # dequantized weight of the kept round
    up: torch.Tensor | None     # L (out, r)
    down: torch.Tensor | None   # R (r, in)
    err_per_round: list[float]
    kept_round: int

    @property
    def error(self) -> float:
        return self.err_per_round[self.kept_round] if self.err_per_round else float("nan")


# randomized range finder: oversampling, power iterations of a cold start and of a warm start
OVERSAMPLE = 16
COLD_ITERS = 4
WARM_ITERS = 1


def low_rank(e: torch.Tensor, rank: int, method: str = "exact", seed: int = 0,
             start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Best rank-``rank`` factors (L, R) of ``e``: L = U sqrt(S), R = sqrt(S) Vh; and a warm start.

    ``exact``: LAPACK SVD (the third value is None). ``randomized``: a randomized range finder
    (Halko et al.) with ``OVERSAMPLE`` extra columns: from a Gaussian start drawn from its own
    generator seeded by ``seed`` (no global RNG: fits may run in parallel threads) and
    ``COLD_ITERS`` power iterations, or, given ``start`` (the (in, rank + oversample) basis a
    previous fit returned), ``WARM_ITERS`` iterations from it. The third value is this fit's basis,
    the warm start for the next fit of a nearby matrix (the next LoRA round's residual).
    """
    # LAPACK's SVD with several OpenMP threads on a busy machine can be ~20-1000x slower than with
    # one (threads spin-wait for each other); the fits here are small enough for one thread
    with torch_threads(1):
        return _low_rank(e, rank, method, seed, start)


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block with torch's intra-op thread count set to ``n``, then restores it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _low_rank(e: torch.Tensor, rank: int, method: str, seed: int, start: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    rank = min(rank, *e.shape)
    basis = None
    if method == "exact":
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
    elif method == "randomized":
        u, s, vh = _randomized_svd(e, min(rank + OVERSAMPLE, *e.shape), seed, start)
        basis = vh.T
    else:
        raise ValueError(f"unknown low-rank method {method!r}")
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], basis


def _randomized_svd(e: torch.Tensor, width: int, seed: int, start: torch.Tensor | None):
    """SVD of ``e`` restricted to an approximate top-``width`` subspace (subspace iteration)."""
    if start is not None and start.shape == (e.shape[1], width):
        omega, iters = start, WARM_ITERS
    else:
        g = torch.Generator().manual_seed(seed)
        omega, iters = torch.randn(e.shape[1], width, generator=g, dtype=e.dtype), COLD_ITERS
    q = torch.linalg.qr(e @ omega).Q
    for _ in range(iters):
        q = torch.linalg.qr(e.T @ q).Q
        q = torch.linalg.qr(e @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ e, full_matrices=False)
    return q @ ub, s, vh


def resolve_svd(method: str, shape: tuple[int, int]) -> str:
    if method == "auto":
        return "exact" if min(shape) <= 1024 else "randomized"
    return method


def training_free_lora(w: torch.Tensor, quantizer: WeightQuantizer, rank: int, rounds: int,
                       keep: str = "best", svd: str = "auto") -> LoraFit:
    """Runs ``rounds`` alternating rounds; returns the kept round's codes and factors.

    ``rank == 0``: plain quantization (one round, no factors).
    """
    w = w.float()
    if rank <= 0:
        codes, deq = quantizer(w)
        return LoraFit(codes, deq, None, None, [float(torch.linalg.norm(w - deq))], 0)
    method = resolve_svd(svd, tuple(w.shape))
    lr = torch.zeros_like(w)
    best: LoraFit | None = None
    errs: list[float] = []
    basis = None  # randomized SVD: each round's subspace warm-starts the next (residuals change little)
    for r in range(rounds):
        codes, deq = quantizer(w - lr)
        resid = w - deq
        up, down, basis = low_rank(resid, rank, method, seed=r, start=basis)
        lr = up @ down
        err = float(torch.linalg.norm(resid.sub_(lr)))  # resid is not needed after this
        errs.append(err)
        if keep == "last" or best is None or err < errs[best.kept_round]:
            best = LoraFit(codes, deq, up, down, errs, r)
    assert best is not None
    best.err_per_round = errs
    return best
