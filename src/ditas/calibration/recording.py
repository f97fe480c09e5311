"""``record_calibration``: capture what block-wise calibration needs from any run of the model.

Data-free calibration for any pipeline: while the context is open, every call of the model's
first block (as its adapter names it) is recorded with its args and kwargs (detached copies);
calls of the model itself (through ``model(...)``) are counted in ``model_calls``. Any code may drive the model: a diffusers pipeline with
the user's prompts, a hand-written loop, ditas' own sampler. Block-wise replay
(``blockwise.py``) then recomputes every layer's FP inputs from these calls.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ..errors import CalibrationError
from ..model.adapters.base import BlockCall, CalibrationRecord
from ..model.adapters.registry import adapter_for


@contextmanager
def record_calibration(model: nn.Module) -> Iterator[CalibrationRecord]:
    """``with record_calibration(transformer) as calib: pipe(...)``; then ``quantize_(transformer,
    config, calib)``. The record fills while the context is open."""
    adapter = adapter_for(model)
    blocks = adapter.blocks()
    if not blocks:
        raise CalibrationError(f"the {type(model).__name__} has no transformer blocks to record")
    first = adapter.block_module(blocks[0])
    record = CalibrationRecord(calls=[], info={"family": adapter.family})

    def on_block(module, args, kwargs):
        record.calls.append(BlockCall(tuple(args), dict(kwargs)).detached())

    def on_model(module, args, kwargs):
        record.model_calls += 1

    handles = [first.register_forward_pre_hook(on_block, with_kwargs=True),
               model.register_forward_pre_hook(on_model, with_kwargs=True)]
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        for h in handles:
            h.remove()
        record.wall_time_s = time.perf_counter() - t0
