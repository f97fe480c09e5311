"""Block-by-block recomputation of the FP layer inputs from a recorded trajectory.

For block ``i`` we hold its call (``BlockCall``: args and kwargs) at every calibration step. One
FP pass of that block per step, with forward pre-hooks on its quantizable linears, yields every
layer's inputs (both CFG halves, all tokens) and the block's outputs, from which the model's
adapter makes the calls of block ``i + 1`` (``ModelAdapter.next_call``). Layer inputs do not depend
on which layers are quantized (the search compares against the FP model), so this gives each
layer exactly the inputs a per-layer observation run of the FP model would give, at the cost of
about one model pass. Memory: one block's inputs over the calibration set (plus a token
subsample per step for the search).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CalibrationError
from ..model.adapters.base import BlockCall
from .inputs import LayerInputs


def subsample_index(n: int, k: int | None, seed: int, step: int) -> torch.Tensor | None:
    """Rows kept for the search loss at ``step`` (None: all). Deterministic in (seed, step).

    The generator seed wraps to 64 bits (torch's range), so every valid seed (``validate.MAX_SEED``)
    works; below 2**64 / 1_000_003 (about 1.8e13) it is the unwrapped value of earlier versions."""
    if k is None or k >= n:
        return None
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2 ** 64)
    return torch.randperm(n, generator=g)[:k].sort().values


class _Collector:
    def __init__(self, name: str, k: int | None, seed: int):
        self.name, self.k, self.seed = name, k, seed
        self.xs: list[torch.Tensor] = []
        self.colmin: list[torch.Tensor] = []
        self.colmax: list[torch.Tensor] = []
        self.absmax: torch.Tensor | None = None
        self.step = 0

    def __call__(self, module, args):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise CalibrationError(f"non-finite input (NaN or inf) at layer {self.name}, calibration step {self.step}")
        lo, hi = x.amin(dim=0), x.amax(dim=0)
        self.colmin.append(lo)
        self.colmax.append(hi)
        a = torch.maximum(lo.abs(), hi.abs())
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        idx = subsample_index(x.shape[0], self.k, self.seed, self.step)
        self.xs.append(x.clone() if idx is None else x[idx].clone())

    def result(self) -> LayerInputs:
        return LayerInputs(self.xs, torch.stack(self.colmin), torch.stack(self.colmax), self.absmax)


def _default_outputs(y):
    return [y] if isinstance(y, torch.Tensor) else [t for t in y if isinstance(t, torch.Tensor)]


@torch.no_grad()
def block_layer_inputs(block: nn.Module, block_name: str, rel_names: list[str], calls: list[BlockCall],
                       search_tokens: int | None = None, seed: int = 0, output_tensors=_default_outputs
                       ) -> tuple[dict[str, LayerInputs], list]:
    """Inputs of the block's layers ``rel_names`` at every step, and the block's outputs.

    ``calls[t]`` is the block's call at step ``t``; ``output_tensors`` picks the tensors of an
    output that must be finite (a block may return a tuple).
    """
    collectors = {rel: _Collector(f"{block_name}.{rel}", search_tokens, seed) for rel in rel_names}
    handles = [block.get_submodule(rel).register_forward_pre_hook(collectors[rel]) for rel in rel_names]
    outs = []
    try:
        for t, call in enumerate(calls):
            for col in collectors.values():
                col.step = t
            y = block(*call.args, **call.kwargs)
            if not all(torch.isfinite(o).all() for o in output_tensors(y)):
                raise CalibrationError(f"non-finite output (NaN or inf) of {block_name} at calibration step {t}")
            outs.append(y)
    finally:
        for h in handles:
            h.remove()
    return {rel: col.result() for rel, col in collectors.items()}, outs
