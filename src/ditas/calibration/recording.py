"""``record_calibration``: capture what block-wise calibration needs from any run of the model.

Data-free calibration for any pipeline: while the context is open, every call of the model's
first block (as its hand-written adapter names it) is recorded with its args and kwargs
(detached copies); calls of the model itself (through ``model(...)``) are counted in
``model_calls``. Any code may drive the model: a diffusers pipeline with the user's prompts, a
hand-written loop, ditas' own sampler. Block-wise replay (``blockwise.py``) then recomputes every
layer's FP inputs from these calls.

For the generic adapter (``model/adapters/generic_probe.py``) the first model call is also the probe:
hooks watch it and make the model's structure (``record.structure``); from then on the calls of
every block that starts a segment (the first block, and any block whose call is not made from
the previous block's output alone) are recorded (``record.segments``), in memory or streamed to
disk under ``calib_cache``. A model without a hand-written adapter whose structure cannot be
found fails here, in one line, before or right after its first call.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from torch import nn

from ..errors import CalibrationError
from ..model.adapters.base import BlockCall, CalibrationRecord
from ..model.adapters.generic_calls import CallStore, cache_folder
from ..model.adapters.generic_probe import StructureProbe
from ..model.adapters.registry import hand_written_adapter


class _Stores:
    """One ``CallStore`` per recorded block module (in a subfolder of the cache folder each)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.stores: dict[nn.Module, CallStore] = {}

    def get(self, module: nn.Module) -> CallStore:
        if module not in self.stores:
            sub = None
            if self.folder is not None:
                sub = self.folder / str(len(self.stores))
                sub.mkdir()
            self.stores[module] = CallStore(sub)
        return self.stores[module]


def _recorder(store: CallStore, probe: StructureProbe | None):
    def on_block(module, args, kwargs):
        if probe is None or not probe.replaying:  # the probe's check replays blocks: not a model call
            store.append(BlockCall(tuple(args), dict(kwargs)).detached())
    return on_block


@contextmanager
def record_calibration(model: nn.Module, calib_cache: str | Path | None = None) -> Iterator[CalibrationRecord]:
    """``with record_calibration(transformer) as calib: pipe(...)``; then ``quantize_(transformer,
    config, calib)``. The record fills while the context is open. ``calib_cache``: a folder under
    which the recorded block calls are streamed to disk (removed with the record) instead of
    kept in memory."""
    hand = hand_written_adapter(model)
    first = None
    if hand is not None:
        blocks = hand.blocks()
        if not blocks:
            raise CalibrationError(f"the {type(model).__name__} has no transformer blocks to record")
        first = hand.block_module(blocks[0])
    try:
        probe: StructureProbe | None = StructureProbe(model)
    except CalibrationError:
        if hand is None:
            raise
        probe = None
    record = CalibrationRecord(calls=[], info={"family": hand.family if hand is not None else "generic"})
    stores = _Stores(cache_folder(calib_cache, record))
    handles = []
    if first is not None:
        record.calls = stores.get(first)
        handles.append(first.register_forward_pre_hook(_recorder(record.calls, probe), with_kwargs=True))

    def on_model(module, args, kwargs):
        record.model_calls += 1
        if probe is not None and record.model_calls == 1:
            probe.arm()

    def after_model(module, args, output):
        if probe is None or record.model_calls != 1 or record.structure is not None:
            return
        try:
            structure = probe.finish()
        except Exception as exc:  # noqa: BLE001 (a hand-written family records as before, whatever the probe met)
            if hand is None:
                raise
            record.info["generic"] = f"no structure for the generic adapter: {exc}"
            return
        record.structure = structure
        for name in structure.segment_starts:
            module = model.get_submodule(name)
            store = stores.get(module)
            record.segments[name] = store
            if module is first:
                continue  # recorded by the hand-written adapter's hook already, this call included
            if name in probe.pending:
                store.append(probe.pending[name])
            handles.append(module.register_forward_pre_hook(_recorder(store, probe), with_kwargs=True))
        if hand is None:
            record.calls = record.segments[structure.segment_starts[0]]
        probe.pending = {}

    handles += [model.register_forward_pre_hook(on_model, with_kwargs=True),
                model.register_forward_hook(after_model)]
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        for h in handles:
            h.remove()
        if probe is not None:
            probe.close()
        record.wall_time_s = time.perf_counter() - t0
