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


def low_rank(e: torch.Tensor, rank: int, method: str = "exact", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (L, R) of ``e``: L = U sqrt(S), R = sqrt(S) Vh.

    ``exact``: LAPACK SVD. ``randomized``: ``torch.svd_lowrank`` with oversampling and 4 power
    iterations (a near-optimal rank-r fit at a fraction of the cost for large layers).
    """
    with _lapack_threads():
        return _low_rank(e, rank, method, seed)


@contextlib.contextmanager
def _lapack_threads(n: int = 1):
    """LAPACK's SVD with several OpenMP threads on a busy machine can be ~20-1000x slower than with
    one (threads spin-wait for each other); the fits here are small enough for one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _low_rank(e: torch.Tensor, rank: int, method: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rank = min(rank, *e.shape)
    if method == "exact":
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    elif method == "randomized":
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            u, s, v = torch.svd_lowrank(e, q=min(rank + 16, *e.shape), niter=4)
        finally:
            torch.random.set_rng_state(state)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        raise ValueError(f"unknown low-rank method {method!r}")
    root = s.sqrt()
    return u * root, root[:, None] * vh


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
    for r in range(rounds):
        codes, deq = quantizer(w - lr)
        resid = w - deq
        up, down = low_rank(resid, rank, method, seed=r)
        lr = up @ down
        err = float(torch.linalg.norm(resid - lr))
        errs.append(err)
        if keep == "last" or best is None or err < errs[best.kept_round]:
            best = LoraFit(codes, deq, up, down, errs, r)
    assert best is not None
    best.err_per_round = errs
    return best
