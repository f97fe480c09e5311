"""What a saved quantized layer holds, written once.

A ``QuantLinear`` in a quantized folder is its entry in ``config.json`` (``LAYER_META``: each
field's type, range or choices) plus its tensors in ``model.safetensors`` (``layer_tensors``:
each tensor's presence, shape and dtype in memory). The same table serves the four places that
used to spell it each their own way: ``QuantLinear`` allocates ``layer_tensors`` (so ``convert``
builds exactly the saved shape), ``save`` writes ``layer_meta`` and the tensors in
``TENSOR_NAMES`` order, ``check_layer_table`` validates a folder's entries against
``LAYER_META``, and ``load`` builds the layer from ``layer_args`` and refuses a folder that lacks
a tensor the entry calls for, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from .config import LORA_STORAGE, ActivationFormat, WeightFormat
from .quantizers import ACT_GRANULARITIES, DEFAULT_ACT_GROUP, FORMATS, RANGE_MODES, WEIGHT_LAYOUTS

LORA_DTYPES = {name: getattr(torch, name) for name in LORA_STORAGE}  # storage of the LoRA factors


@dataclass(frozen=True)
class MetaField:
    """One field of a layer's ``config.json`` entry: its type and range (or choices); ``default``
    for a field older formats lack (None: required)."""

    name: str
    kind: type
    low: int | None = None
    high: int | None = None
    choices: tuple[str, ...] | None = None
    default: Any = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a valid value of this field (None: it is)."""
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            return f"{value!r} ({type(value).__name__})"
        if self.low is not None and value < self.low:
            return f"{value}, expected >= {self.low}" if self.high is None else f"{value}, expected {self.low}..{self.high}"
        if self.high is not None and value > self.high:
            return f"{value}, expected {self.low}..{self.high}"
        if self.choices is not None and value not in self.choices:
            return f"{value!r}, expected one of {', '.join(self.choices)}"
        return None


LAYER_META = (
    MetaField("in_features", int, 1), MetaField("out_features", int, 1),
    MetaField("wbits", int, 2, 8), MetaField("abits", int, 4, 16),
    MetaField("layout", str, choices=WEIGHT_LAYOUTS), MetaField("group_size", int, 0),
    MetaField("act_granularity", str, choices=ACT_GRANULARITIES), MetaField("range_mode", str, choices=RANGE_MODES),
    MetaField("lora_rank", int, 0), MetaField("bias", bool), MetaField("smooth", bool),
    MetaField("lora_dtype", str, choices=LORA_STORAGE, default="float32"),  # format 1 has none: float32
    # format 4: the smoothing factors folded into the layer's input producer / its output rows
    # (``folds``); older formats have none recorded (``folds.unrecorded_folds``)
    MetaField("input_fold", bool, default=False), MetaField("output_fold", bool, default=False),
    # format 5: number formats (int, nvfp4, mxfp4) and the activations' group size; older: int, 64
    MetaField("w_format", str, choices=FORMATS, default="int"), MetaField("a_format", str, choices=FORMATS, default="int"),
    MetaField("act_group_size", int, 1, default=DEFAULT_ACT_GROUP),
    # format 5: the Hadamard block of the online input rotation (rotation.py); 0: none, as older folders read
    MetaField("rotation", int, 0, default=0),
    # format 6: the activations' bits and granularity at the late steps (``QuantConfig.late``); 0: none
    MetaField("late_abits", int, 0, 16, default=0),
    MetaField("late_act_granularity", str, choices=ACT_GRANULARITIES, default="token"),
)
WEIGHT_ONLY_META = (MetaField("in_features", int, 1), MetaField("out_features", int, 1), MetaField("bias", bool),
                    MetaField("compute", str))
TENSOR_NAMES = ("qweight", "wscale", "wzero", "bias", "smooth", "lora_down", "lora_up", "input_fold", "output_fold",
                "wtscale")


def scale_shape(out_f: int, in_f: int, weights: WeightFormat) -> tuple[int, int]:
    """The shape of ``wscale``/``wzero`` for a layout (see ``quantizers.WEIGHT_LAYOUTS``)."""
    if weights.layout == "channel":
        return (out_f, 1)
    if weights.layout == "group":
        if weights.group_size < 1 or in_f % weights.group_size:
            raise ValueError(f"group size {weights.group_size} does not divide in_features {in_f}")
        return (out_f, in_f // weights.group_size)
    if out_f % 32:
        raise ValueError(f"reference32 layout needs out_features divisible by 32, got {out_f}")
    return (out_f // 32, in_f)


def layer_tensors(in_f: int, out_f: int, weights: WeightFormat, *, bias: bool, smooth: bool, lora_rank: int,
                  lora_dtype: torch.dtype, input_fold: bool = False, output_fold: bool = False
                  ) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
    """Each of ``TENSOR_NAMES`` -> (shape, dtype) in memory, or None where the layer has none."""
    groups = scale_shape(out_f, in_f, weights)
    return {"qweight": ((out_f, in_f), torch.uint8), "wscale": (groups, torch.float32),
            "wzero": (groups, torch.float32) if weights.format == "int" else None,
            "wtscale": ((1,), torch.float32) if weights.format == "nvfp4" else None, "bias": ((out_f,), torch.float32) if bias else None,
            "smooth": ((in_f,), torch.float32) if smooth else None,
            "lora_down": ((lora_rank, in_f), lora_dtype) if lora_rank else None,
            "lora_up": ((out_f, lora_rank), lora_dtype) if lora_rank else None,
            "input_fold": ((in_f,), torch.float32) if input_fold else None,
            "output_fold": ((out_f,), torch.float32) if output_fold else None}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in LORA_DTYPES.items() if d == dtype)


def layer_meta(m: Any) -> dict[str, Any]:
    """A ``QuantLinear``'s entry in ``config.json`` (the fields of ``LAYER_META``)."""
    w, a = m.weight_format, m.activation_format
    return {"in_features": m.in_features, "out_features": m.out_features, "wbits": w.bits, "abits": a.bits,
            "layout": w.layout, "group_size": w.group_size, "act_granularity": a.granularity,
            "range_mode": w.range_mode, "lora_rank": m.lora_rank, "bias": m.bias is not None,
            "smooth": m.smooth is not None, "lora_dtype": dtype_name(m.lora_dtype or torch.float32),
            "input_fold": m.input_fold is not None, "output_fold": m.output_fold is not None,
            "w_format": w.format, "a_format": a.format, "act_group_size": a.group_size,
            "rotation": getattr(m, "rotation", 0), **late_meta(getattr(m, "late_activation_format", None))}


def late_meta(late: ActivationFormat | None) -> dict[str, Any]:
    """The late-step fields of a layer's entry (``late_abits`` 0: no late-step format)."""
    return {"late_abits": 0, "late_act_granularity": "token"} if late is None else \
        {"late_abits": late.bits, "late_act_granularity": late.granularity}


def layer_args(meta: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of ``QuantLinear`` for a checked entry (``check_layer_table``)."""
    weights = WeightFormat(meta["wbits"], meta["layout"], meta["group_size"], meta["range_mode"],
                           meta.get("w_format", "int"))
    activations = ActivationFormat(meta["abits"], meta["act_granularity"], meta["range_mode"],
                                   meta.get("a_format", "int"), meta.get("act_group_size", DEFAULT_ACT_GROUP))
    dtype = LORA_DTYPES[meta.get("lora_dtype", "float32")]
    late = None
    if meta.get("late_abits", 0):
        late = activations.late_format(meta["late_abits"], meta.get("late_act_granularity", "token"))
    return ((meta["in_features"], meta["out_features"], weights, activations),
            {"bias": meta["bias"], "lora_rank": meta["lora_rank"], "has_smooth": meta["smooth"], "lora_dtype": dtype,
             "has_input_fold": meta.get("input_fold", False), "has_output_fold": meta.get("output_fold", False),
             "rotation": meta.get("rotation", 0), "late_activations": late})


def expected_tensor_names(meta: dict[str, Any]) -> list[str]:
    """The tensors a saved layer with this entry must hold (``TENSOR_NAMES`` order)."""
    w_format = meta.get("w_format", "int")
    present = {"wzero": w_format == "int", "wtscale": w_format == "nvfp4", "bias": meta["bias"], "smooth": meta["smooth"], "lora_down": meta["lora_rank"] > 0,
               "lora_up": meta["lora_rank"] > 0, "input_fold": meta.get("input_fold", False),
               "output_fold": meta.get("output_fold", False)}
    return [t for t in TENSOR_NAMES if present.get(t, True)]


def _check_entry(table: tuple[MetaField, ...], name: str, meta: Any, source: str, what: str) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: the entry of {what} {name} is {type(meta).__name__}, expected an object")
    for f in table:
        if f.name not in meta:
            if f.default is not None:
                continue
            raise CheckpointError(f"{source}: {what} {name} lacks '{f.name}'")
        problem = f.problem(meta[f.name])
        if problem:
            raise CheckpointError(f"{source}: {what} {name} has {f.name} = {problem}")


def check_layer_table(q: Any, source: str) -> None:
    """The ``quantization`` object of a quantized folder's ``config.json``: types and ranges of
    every layer entry, so a hand-edited or corrupted file fails with the field it got wrong."""
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: 'quantization' is {type(q).__name__}, expected an object")
    layers = q.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{source}: 'quantization.layers' must be a non-empty object (layer name -> entry), "
                              f"got {type(layers).__name__}")
    for name, meta in layers.items():
        _check_entry(LAYER_META, name, meta, source, "quantized layer")
    wo = q.get("weight_only_layers", {})
    if not isinstance(wo, dict):
        raise CheckpointError(f"{source}: 'quantization.weight_only_layers' is {type(wo).__name__}, expected an object")
    for name, meta in wo.items():
        _check_entry(WEIGHT_ONLY_META, name, meta, source, "weight-only layer")


def check_layer_tensors(name: str, meta: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> None:
    """A saved layer holds every tensor its entry calls for (named when one is missing)."""
    for t in expected_tensor_names(meta):
        if f"{name}.{t}" not in state:
            raise CheckpointError(f"{source}: quantized layer {name} lacks its tensor '{t}' ({name}.{t})")
