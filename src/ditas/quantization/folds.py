"""What a smoothing fold changed, recorded on the layers it changed (for LoRA adapters).

Folding a smoothing factor ``s`` (``smoothing.apply_fold``) is exact for the model itself but
changes what two layers read or write: the quantized linears of the group read ``x / s`` instead
of ``x``, and the fold's target (a modulation linear's shift/scale rows, or a preceding linear's
rows for ``prev_rows``) outputs rows whose *change* is divided by ``s``. A LoRA adapter trained on
the float model adds ``B A x`` to a layer's output, so on the quantized model it must read
``x * s`` and add its output divided by the rows' factor. Each layer therefore holds, under these
role names:

- ``input_fold`` (in,): the factor folded into its input's producer (``QuantLinear`` only);
- ``output_fold`` (out,): per output row, the factor its rows' changes are divided by (1 where
  none); a ``QuantLinear`` (a ``prev_rows`` target quantized after the fold) or a float
  ``nn.Linear`` (a modulation linear or a float ``prev_rows`` target), whose buffer the
  ``quantization`` table lists under ``folded_float_layers`` so that loading puts it back.

Folders written before format version 4 hold neither: their folded layers are marked
``FOLD_UNKNOWN`` at load, and a LoRA adapter on them is refused (re-quantize) instead of silently
reading the wrong input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

INPUT_FOLD, OUTPUT_FOLD = "input_fold", "output_fold"
FOLD_UNKNOWN = "ditas_fold_unknown"  # attribute on a loaded layer whose fold an older folder did not record
FOLDS_RECORDED_SINCE = 4  # the format version that records them


def fold_factors(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(input_fold, output_fold) of a layer, None where it has none."""
    buffers = module._buffers
    return buffers.get(INPUT_FOLD), buffers.get(OUTPUT_FOLD)


@torch.no_grad()
def record_output_fold(module: nn.Module, s: torch.Tensor, rows: slice) -> None:
    """Notes that the output ``rows`` of ``module`` now change by ``1 / s`` (multiplied into an
    existing record: a modulation linear takes one fold per group it feeds)."""
    current = module._buffers.get(OUTPUT_FOLD)
    if current is None:
        current = torch.ones(module.out_features, dtype=torch.float32, device=s.device)
        if OUTPUT_FOLD in module._buffers:  # a QuantLinear's declared (absent) slot
            module._buffers[OUTPUT_FOLD] = current
        else:
            module.register_buffer(OUTPUT_FOLD, current)
    current[rows] *= s.to(current)


def output_fold_vector(out_features: int, folds: list[tuple[slice, torch.Tensor]]) -> torch.Tensor | None:
    """The ``output_fold`` of a layer whose ``rows`` were divided by each ``s`` of ``folds`` (None: none)."""
    if not folds:
        return None
    v = torch.ones(out_features)
    for rows, s in folds:
        v[rows] *= s.float().cpu()
    return v


def folded_float_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The float linears holding an ``output_fold`` (name -> entry for the ``quantization`` table)."""
    return {name: {"out_features": m.out_features} for name, m in model.named_modules()
            if type(m) is nn.Linear and m._buffers.get(OUTPUT_FOLD) is not None}


def add_float_fold_slots(model: nn.Module, entries: dict[str, Any], source: Any) -> None:
    """Empty ``output_fold`` buffers on the float linears ``entries`` names, for the saved ones to land in."""
    from ..errors import CheckpointError

    if not isinstance(entries, dict):
        raise CheckpointError(f"{source}: 'folded_float_layers' is {type(entries).__name__}, expected an object")
    for name, entry in entries.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if type(lin) is not nn.Linear or not isinstance(entry, dict) or entry.get("out_features") != lin.out_features:
            raise CheckpointError(f"{source}: folded float layer {name} is not a linear of the model with "
                                  f"{entry.get('out_features') if isinstance(entry, dict) else entry} outputs")
        lin.register_buffer(OUTPUT_FOLD, torch.ones(lin.out_features, device=lin.weight.device))


def unrecorded_folds(model: nn.Module, q: dict[str, Any]) -> set[str]:
    """For a folder older than ``FOLDS_RECORDED_SINCE`` (``q``: its checked table; ``model``: the float
    skeleton): the layers a fold may have changed without a record, so that LoRA refuses them. A
    group folded when its config smooths its role, its fold is not on the fly, and its members
    hold no on-the-fly ``smooth``."""
    from ..errors import ConfigError
    from ..model.adapters.registry import adapter_for
    from .config import QuantConfig

    if q.get("format_version", 0) >= FOLDS_RECORDED_SINCE:
        return set()
    try:
        cfg = QuantConfig.from_dict(q.get("config", {}))
    except ConfigError:  # a hand-written table: assume every foldable group was folded
        cfg = None
    layers, out = q["layers"], set()
    for block in adapter_for(model).blocks():
        for g in block.groups:
            if g.fold.kind == "on_the_fly" or (cfg is not None and not cfg.smooths(g.role)):
                continue
            if g.fold.kind == "prev_rows" and cfg is not None and not cfg.smooth.fold_proj_into_v:
                continue
            members = [m.name for m in g.members if m.name in layers and not layers[m.name]["smooth"]]
            out.update(members)
            if members and g.fold.kind != "table_rows":
                out.add(g.fold.target)
    return out
