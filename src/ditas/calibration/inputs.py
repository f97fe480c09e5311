"""``LayerInputs``: what the alpha search needs from one layer's FP inputs over the calibration run."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerInputs:
    """What the search needs from a layer's FP inputs over the calibration run.

    ``xs[t]``: (tokens_t, in) inputs at step t (possibly a token subsample); ``colmin``/``colmax``
    (steps, in): per-step channel extremes over all tokens; ``absmax`` (in,): channel abs max over
    all steps and tokens (TAS's a_j).
    """

    xs: list[torch.Tensor]
    colmin: torch.Tensor
    colmax: torch.Tensor
    absmax: torch.Tensor
