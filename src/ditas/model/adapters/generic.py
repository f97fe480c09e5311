"""The generic adapter: any ``nn.Module`` transformer, described from its module tree and ONE
recorded call, with no per-model code.

The work is split by job:

- ``generic_probe.py``: how the structure is found (``StructureProbe``: blocks, smoothing groups,
  roles, modulation linears, the linears left float and why, block-wise replay or segments);
- ``generic_structure.py``: what it finds (``GenericStructure``, plain data kept on the model);
- ``generic_calls.py``: the recorded calls of the blocks that start a segment (``CallStore``),
  in memory or under ``calib_cache``;
- this module: the adapter that turns a structure into block specs, and the choice of adapter.

Checkpoints: diffusers classes rebuild from class name + config (as ``DiffusersAdapter``),
ditas' DiT from its config; the layer table says which linears are quantized, so loading needs
no probe. Other classes quantize and run but cannot be saved (a one-line error).

``select_adapter`` picks it: ``QuantConfig.scope.adapter == "generic"``, or no hand-written
adapter matches the model. The structure lives on the model (``STRUCTURE_ATTR``) so that every
verb's ``adapter_for(model)`` sees the same description.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from ...errors import CalibrationError, CheckpointError, ConfigError
from .base import ON_THE_FLY, BlockCall, BlockSpec, CalibrationRecord, Fold, LinearSpec, ModelAdapter, SmoothGroup
from .generic_probe import StructureProbe
from .generic_structure import GenericStructure
from .registry import STRUCTURE_ATTR, hand_written_adapter, register


# ----------------------------------------------------------------------------------------------
#                                       The adapter
# ----------------------------------------------------------------------------------------------


@register
class GenericAdapter(ModelAdapter):
    family = "generic"

    def __init__(self, model: nn.Module, structure: GenericStructure | None = None):
        super().__init__(model)
        self.structure = structure if structure is not None else getattr(model, STRUCTURE_ATTR, None)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False  # never picked by matching: the registry falls back to it

    def _known(self) -> GenericStructure:
        if self.structure is None:
            raise ConfigError(f"ditas has no adapter for a {type(self.model).__name__}: the generic adapter needs a "
                              "recorded call; record one with ditas.record_calibration(model) around a run of your "
                              "pipeline and pass it to quantize_")
        if self.structure.model_class != type(self.model).__name__:
            raise ConfigError(f"the recorded structure is of a {self.structure.model_class}, not a "
                              f"{type(self.model).__name__}")
        return self.structure

    def blocks(self) -> list[BlockSpec]:
        specs = []
        for i, b in enumerate(self._known().blocks):
            folds = {p: Fold("prev_rows", f"{b.name}.{t}", rows=rows) for p, t, rows in b.folds}
            groups = [SmoothGroup(tuple(LinearSpec(f"{b.name}.{r}", i, r, role) for r in rels), role,
                                  folds.get(rels[0], ON_THE_FLY)) for rels, role in b.groups]
            groups.sort(key=lambda g: g.fold.kind != "prev_rows")  # folded into rows before those are quantized
            specs.append(BlockSpec(b.name, i, b.stack, tuple(groups)))
        return specs

    def weight_only_linears(self) -> list[str]:
        return [f"{b.name}.{r}" for b in self._known().blocks for r in b.weight_only]

    def next_call(self, block: BlockSpec, call: BlockCall, output: Any) -> BlockCall:
        nxt = self._known().blocks[block.index + 1]
        if nxt.transition is None:
            raise CalibrationError(f"{nxt.name} is not replayed from {block.name} ({nxt.why})")
        return nxt.transition.apply(call, output)

    def recorded_calls(self, block: BlockSpec, record: CalibrationRecord) -> Any:
        b = self._known().blocks[block.index]
        if b.transition is not None:
            return None
        calls = record.segments.get(b.name)
        if not calls:
            raise CalibrationError(f"the calibration record has no calls of {b.name}, where a segment starts "
                                   f"({b.why}): record it with ditas.record_calibration on this model")
        return calls

    def report_info(self) -> dict[str, Any]:
        s = self._known()
        return {"name": self.family,
                "blocks": {b.name: "replayed" if b.transition is not None else f"recorded inputs ({b.why})"
                           for b in s.blocks},
                "weight_only": self.weight_only_linears(),
                "not_quantized": dict(s.not_quantized)}

    # -- checkpoints ------------------------------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        from ._diffusers import jsonable

        cls = type(self.model)
        if cls.__module__.startswith("diffusers") and hasattr(self.model, "config"):
            cfg = {k: jsonable(v) for k, v in dict(self.model.config).items()
                   if not k.startswith("_") and k != "quantization_config"}
            return {"library": "diffusers", "class": cls.__name__, "config": cfg}
        from ..dit import DiT

        if isinstance(self.model, DiT):
            return {"library": "ditas", "class": "DiT", "config": self.model.config.to_dict()}
        raise CheckpointError(f"a {cls.__name__} cannot be rebuilt from a config: the generic adapter saves "
                              "diffusers transformers and ditas' DiT only")

    @classmethod
    def build(cls, config: dict[str, Any]) -> nn.Module:
        lib, name, cfg = config.get("library"), config.get("class"), config.get("config")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"not a generic model config: {sorted(config)}")
        if lib == "diffusers":
            from ._diffusers import diffusers_class

            return diffusers_class(name).from_config(cfg)
        if lib == "ditas" and name == "DiT":
            from ..dit import DiT, DiTConfig

            return DiT(DiTConfig.from_dict(cfg))
        raise CheckpointError(f"the generic adapter cannot build a {lib}.{name}")


# ----------------------------------------------------------------------------------------------
#                                  Choosing the adapter
# ----------------------------------------------------------------------------------------------


def wants_generic(model: nn.Module, config: Any) -> bool:
    """Whether ``config`` (a QuantConfig) quantizes ``model`` through the generic adapter."""
    return config.scope.adapter == "generic" or hand_written_adapter(model) is None


def skipped(name: str, patterns: tuple[str, ...]) -> str | None:
    """The first ``--skip`` pattern ``name`` matches (None: none)."""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def select_adapter(model: nn.Module, config: Any, record: CalibrationRecord) -> tuple[ModelAdapter, CalibrationRecord]:
    """The adapter that quantizes ``model`` under ``config``, and the record it calibrates on.

    The generic one keeps its structure on the model (every later ``adapter_for`` sees it). Its
    structure comes from the record's probe; a record without one (a DiT self-calibration) gets
    it from one synthetic call of the model, when its calls are those of the structure's only
    segment."""
    hand = hand_written_adapter(model)
    if not wants_generic(model, config):
        model.__dict__.pop(STRUCTURE_ATTR, None)
        return hand, record
    if record.structure is None:
        record = _probed_self_record(model, hand, record)
    setattr(model, STRUCTURE_ATTR, record.structure)
    return GenericAdapter(model, record.structure), record


@torch.no_grad()
def _probed_self_record(model: nn.Module, hand: ModelAdapter | None, record: CalibrationRecord) -> CalibrationRecord:
    own = hand.calibration_sampler() if hand is not None else None
    if own is None or own.model is not model or own.linear_prefix:
        raise CalibrationError("this calibration record has no structure probe for the generic adapter: record it "
                               "with ditas.record_calibration(model) around a run of the model")
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    p = next(model.parameters())
    x = x.to(p.device, p.dtype)
    t = torch.full((2,), 500, device=p.device)
    y = torch.zeros(2, dtype=torch.long, device=p.device)
    probe = StructureProbe(model)
    probe.arm()
    try:
        model(x, t, y)
    finally:
        structure = probe.finish()
    starts = structure.segment_starts
    first = probe.block_of.get(own.first_block)
    if starts != [first]:
        raise CalibrationError(f"the {type(model).__name__}'s blocks are not one chain from {first} (segments start at "
                               f"{starts}): record a calibration with ditas.record_calibration")
    return CalibrationRecord(record.calls, record.model_calls, record.wall_time_s, None, dict(record.info),
                             structure, {first: record.calls})
