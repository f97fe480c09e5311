"""``record_calibration``: data-free calibration from any run of the user's own pipeline.

    with ditas.record_calibration(pipe.transformer) as calib:
        pipe(prompts, num_inference_steps=20)      # any code that calls the transformer

While the context is open, a forward pre-hook on the model's FIRST block (asked from the family's
adapter) keeps a detached copy of that block's call, positional and keyword arguments, every time
the model runs: the image tokens, the text states, the timestep conditioning, rotary embeddings,
for every denoising step and both guidance halves as the pipeline batches them. That call is all
block-wise calibration needs (``calibration/blockwise.py`` replays block by block from it), so
the user's pipeline run is the one FP run; no image and no dataset is involved, only prompts.
The record lives on the model's device; ``CalibrationRecord.calls`` is filled as calls happen.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from torch import nn

from ..errors import CalibrationError
from ..model.adapters.base import BlockCall, CalibrationRecord


@contextlib.contextmanager
def record_calibration(model: nn.Module, max_calls: int | None = None) -> Iterator[CalibrationRecord]:
    """Records the first block's call for every forward of ``model`` inside the ``with`` block.

    ``max_calls`` keeps only the first that many calls (None: all). Raises ``CalibrationError``
    at exit if the model was never called. The model itself is not changed.
    """
    from ..model.adapters.registry import adapter_for

    adapter = adapter_for(model)
    blocks = adapter.blocks()
    if not blocks:
        raise CalibrationError(f"the {adapter.family} model has no blocks to calibrate")
    if max_calls is not None and max_calls < 1:
        raise CalibrationError(f"max_calls must be at least 1, got {max_calls}")
    first = adapter.block_module(blocks[0])
    record = CalibrationRecord(calls=[], info={"family": adapter.family, "recorded_from": "record_calibration"})
    t0 = time.perf_counter()

    def hook(module, args, kwargs):
        record.model_calls += 1
        if max_calls is None or len(record.calls) < max_calls:
            record.calls.append(BlockCall(tuple(args), dict(kwargs)).detached())

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()
        record.wall_time_s = time.perf_counter() - t0
    if not record.calls:
        raise CalibrationError("the model was not called inside record_calibration: run your pipeline (or any "
                               "code that calls the model) inside the with block")
