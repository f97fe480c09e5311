"""The verbs: ``prepare`` (which layers), ``calibrate`` (one FP run + block-wise search),
``convert`` (replace layers, fold smoothing) and ``quantize`` (all three).

    model, report = quantize(load_dit(), recipe_config("ditas"))

Nothing here names a family's layers: the model's adapter (``model/adapters``) says which linears
exist, how they group, where each smoothing factor folds and how a block is called.
``calibrate`` never changes the model (it only reads the FP model); ``convert`` changes it in
place. A self-calibration ``Trajectory`` (``calibration/trajectory.py``) can be shared between recipes
with the same calibration settings.
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.blockwise import block_layer_inputs
from ..calibration.trajectory import check_record, self_calibration
from ..errors import CalibrationError, ConfigError
from ..memory import release_freed_memory
from ..model.adapters.base import ON_THE_FLY, BlockSpec, CalibrationRecord, Fold, LinearSpec, SmoothGroup
from ..model.adapters.generic import select_adapter, skipped, wants_generic
from ..model.adapters.registry import adapter_for, hand_written_adapter
from .config import QuantConfig
from .folds import output_fold_vector
from .linear import QuantLinear
from .kernels import AUTO, canonical, use_kernels
from .step_precision import timestep_source, use_step_precision
from .search import LayerQuant, quantize_layer
from .smoothing import apply_fold, fold_weight_rows, row_slice
from .weight_only import quantize_weight_only


@dataclass
class Calibration:
    """The outcome of ``calibrate``: per-group results (keyed by the group's name, its first
    member's qualified name) plus what it cost.

    ``folds``: where each group's factor goes (the adapter's fold, or on the fly where it cannot
    be folded here); ``prefolded``: groups whose factor is already in a later group's weight rows
    (folded before that group was searched and quantized); ``row_folds``: for each such later
    linear, its divided (rows, factor) pairs (the layer records them: ``folds``).
    """

    config: QuantConfig
    layers: dict[str, LayerQuant]
    specs: list[LinearSpec]
    timings: dict[str, float] = field(default_factory=dict)
    forward_passes: dict[str, float] = field(default_factory=dict)
    plan: list[BlockSpec] = field(default_factory=list)
    folds: dict[str, Fold] = field(default_factory=dict)
    prefolded: set[str] = field(default_factory=set)
    row_folds: dict[str, list[tuple[slice, torch.Tensor]]] = field(default_factory=dict)
    rank_caps: dict[str, tuple[int, int]] = field(default_factory=dict)  # group -> (asked, used) LoRA rank
    adapter_info: dict = field(default_factory=dict)  # the report's "adapter" entry (empty: none)


def prepare(model: nn.Module, config: QuantConfig) -> list[BlockSpec]:
    """The blocks and their groups of layers to quantize, from the model's adapter (only members
    that are ``nn.Linear``; a block without any keeps its place for the replay)."""
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"expected a QuantConfig, got {type(config).__name__}")
    adapter = adapter_for(model)
    blocks = adapter.blocks()
    if not blocks:
        raise ConfigError("the model has no transformer blocks: nothing to quantize")
    plan = []
    for b in blocks:
        groups = []
        for g in b.groups:
            members = []
            for spec in g.members:
                module = model.get_submodule(spec.name)
                if isinstance(module, QuantLinear):
                    raise ConfigError(f"{spec.name} is quantized already: quantize a float model")
                if isinstance(module, nn.Linear) and not skipped(spec.name, config.scope.skip):
                    members.append(spec)
            if members:
                fold = g.fold
                if fold.kind == "prev_rows" and skipped(fold.target, config.scope.skip):
                    fold = ON_THE_FLY  # its target stays float: keep the factor with the group
                groups.append(SmoothGroup(tuple(members), g.role, fold))
        plan.append(BlockSpec(b.name, b.index, b.stack, tuple(groups)))
    specs = [lin for b in plan for lin in b.linears]
    if not specs:
        raise ConfigError("the model has no quantizable linear layers (as nn.Linear)")
    lin_of = {s.name: model.get_submodule(s.name) for s in specs}
    if config.weights.layout == "reference32":
        bad = [n for n, m in lin_of.items() if m.out_features % 32]
        if bad:
            raise ConfigError(f"the reference32 weight layout needs out_features divisible by 32 ({bad[0]})")
    if config.weights.layout == "group":
        bad = [n for n, m in lin_of.items() if m.in_features % config.weights.group_size]
        if bad:
            raise ConfigError(f"group size {config.weights.group_size} does not divide the input width of {bad[0]}")
    a = config.activations
    if a.bits < 16 and a.granularity == "group":
        bad = [n for n, m in lin_of.items() if m.in_features % a.group_size]
        if bad:
            raise ConfigError(f"activation group size {a.group_size} does not divide the input width of {bad[0]}")
    for b in plan:
        widths = {g.name: {model.get_submodule(m.name).in_features for m in g.members} for g in b.groups}
        for name, w in widths.items():
            if len(w) != 1:
                raise ConfigError(f"{name}: the linears of one smoothing group read inputs of different widths {w}")
    return plan


def record(model: nn.Module, config: QuantConfig, progress: bool = True) -> CalibrationRecord:
    """The model's own FP calibration run (DiT: shareable between configs with the same
    ``calibration_key``); families that cannot sample on their own raise ``CalibrationError``."""
    prepare(model, config)
    return self_calibration(adapter_for(model), config, progress)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _member_rows(model: nn.Module, group: SmoothGroup) -> list[tuple[LinearSpec, slice]]:
    """Each member's rows in the group's stacked weight."""
    out, start = [], 0
    for m in group.members:
        n = model.get_submodule(m.name).out_features
        out.append((m, slice(start, start + n)))
        start += n
    return out


def _stacked(model: nn.Module, group: SmoothGroup, pending: dict[str, tuple[slice, torch.Tensor]]):
    """The group's weight and bias stacked over its members, with any pending previous-rows folds
    applied, and the output scale that maps errors back to the unfolded outputs (or None)."""
    rows = _member_rows(model, group)
    lins = [model.get_submodule(m.name) for m in group.members]
    if len(lins) == 1:
        weight, bias = lins[0].weight, lins[0].bias
    else:
        weight = torch.cat([lin.weight.detach().float() for lin in lins], dim=0)
        has_bias = any(lin.bias is not None for lin in lins)
        bias = torch.cat([lin.bias.detach().float() if lin.bias is not None else torch.zeros(lin.out_features)
                          for lin in lins]) if has_bias else None
    out_scale = None
    for m, r in rows:
        if m.name not in pending:
            continue
        sub, s = pending.pop(m.name)
        sub = slice(r.start + sub.start, r.start + sub.stop)
        weight, bias = fold_weight_rows(weight, bias, s, sub)
        if out_scale is None:
            out_scale = torch.ones(weight.shape[0])
        out_scale[sub] = s
    return weight, bias, out_scale


def _first_batch(call) -> int:
    for v in list(call.args) + list(call.kwargs.values()):
        if isinstance(v, torch.Tensor) and v.ndim:
            return int(v.shape[0])
    return 0


@torch.no_grad()
def calibrate(model: nn.Module, config: QuantConfig, trajectory: CalibrationRecord | None = None,
              progress: bool = True) -> Calibration:
    """Block by block: FP layer inputs, TAS statistics, alpha searches, LoRA fits.

    ``trajectory``: a ``CalibrationRecord`` (from ``ditas.record_calibration`` or ``record``);
    None: the model samples its own (DiT). Within a block the groups are searched in the
    adapter's order; a group whose factor folds into a later group's rows (``prev_rows``, e.g.
    ``proj`` into qkv's V rows, with ``fold_proj_into_v``) divides those rows before the later
    group is searched and quantized.
    """
    own = hand_written_adapter(model) or adapter_for(model)  # who samples a self-calibration run
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"expected a QuantConfig, got {type(config).__name__}")
    if not wants_generic(model, config):
        prepare(model, config)  # checked before any calibration run
    timings: dict[str, float] = {}
    if trajectory is None:
        trajectory = self_calibration(own, config, progress)
        timings["calibration_run_s"] = trajectory.wall_time_s
    else:
        if not isinstance(trajectory, CalibrationRecord):
            raise CalibrationError(f"calib must be a calibration record (ditas.record_calibration), got "
                                   f"{type(trajectory).__name__}")
        check_record(own, trajectory, config)
        timings["calibration_run_s"] = 0.0
    if not trajectory.calls:
        raise CalibrationError("the calibration record holds no calls of the model: run the model inside "
                               "ditas.record_calibration")
    adapter, trajectory = select_adapter(model, config, trajectory)
    plan = prepare(model, config)
    specs = [lin for b in plan for lin in b.linears]
    t0 = time.perf_counter()
    results: dict[str, LayerQuant] = {}
    folds: dict[str, Fold] = {}
    prefolded: set[str] = set()
    row_folds: dict[str, list[tuple[slice, torch.Tensor]]] = {}
    rank_caps: dict[str, tuple[int, int]] = {}
    calls = trajectory.calls
    bar = tqdm(total=len(specs), desc="calibration: block-wise search", unit="layer", disable=not progress,
               leave=False)
    for bi, bspec in enumerate(plan):
        recorded = adapter.recorded_calls(bspec, trajectory)
        if recorded is not None:  # a segment starts here: its own recorded FP calls
            calls = recorded
        block = model.get_submodule(bspec.name)
        later = {m.name for g in bspec.groups for m in g.members}
        inputs, outs = block_layer_inputs(block, bspec.name, [g.members[0].rel for g in bspec.groups], calls,
                                          config.smooth.search_tokens, config.calibration.seed, adapter.block_output_tensors)
        pending: dict[str, tuple[slice, torch.Tensor]] = {}
        for g in bspec.groups:
            later -= {m.name for m in g.members}
            weight, bias, out_scale = _stacked(model, g, pending)
            gcfg = _capped_rank(model, g, config, rank_caps)
            r = quantize_layer(g.name, g.role, weight, bias, inputs.pop(g.members[0].rel), gcfg, out_scale)
            fold = g.fold
            if fold.kind == "prev_rows":
                target = model.get_submodule(fold.target)
                if not config.smooth.fold_proj_into_v or not isinstance(target, nn.Linear):
                    fold = ON_THE_FLY
                elif fold.target in later:
                    if r.smooth is not None:
                        pending[fold.target] = (row_slice(target.out_features, fold.rows), r.smooth)
                        row_folds.setdefault(fold.target, []).append(pending[fold.target])
                        prefolded.add(g.name)
                elif any(fold.target == m.name for m in specs):
                    fold = ON_THE_FLY  # its target was quantized before: the adapter's order forbids a fold
            folds[g.name] = fold
            results[g.name] = r
            bar.update(len(g.members))
        if bi + 1 < len(plan) and adapter.recorded_calls(plan[bi + 1], trajectory) is None:
            calls = [adapter.next_call(bspec, c, y) for c, y in zip(calls, outs)]
        del inputs, outs
        release_freed_memory()  # this block's buffers back to the OS: the peak follows one block, not depth
    bar.close()
    timings["blockwise_search_s"] = time.perf_counter() - t0
    steps = trajectory.steps
    passes = {
        "calibration_sampling_runs": 1,
        "full_model_forward_passes": steps + steps,   # the sampling run + one block-wise pass per step
        "naive_full_model_forward_passes": steps * len(results),  # one FP observation run per layer
        "batch_per_pass": _first_batch(trajectory.calls[0]),
    }
    return Calibration(config, results, specs, timings, passes, plan, folds, prefolded, row_folds, rank_caps,
                       _adapter_info(adapter, config, plan))


def _capped_rank(model: nn.Module, group: SmoothGroup, config: QuantConfig,
                 caps: dict[str, tuple[int, int]]) -> QuantConfig:
    """``config`` for ``group``, with its LoRA rank capped where the asked rank would make a member
    store at least as many bytes as its float weight (``layer_size.rank_cap``); records the cap in
    ``caps``. Capped, not refused: one narrow layer should not fail a run whose other layers take
    the rank, and the report says which layers got less."""
    from .layer_size import rank_cap
    from .linear import LORA_DTYPES

    rank = config.lora.rank
    if not rank:
        return config
    shapes = [(lin.in_features, lin.out_features, lin.weight.dtype)
              for lin in (model.get_submodule(m.name) for m in group.members)]
    cap = rank_cap(shapes, config.weights, LORA_DTYPES[config.lora.dtype], config.smooths(group.role), rank)
    if cap >= rank:
        return config
    caps[group.name] = (rank, cap)
    return config.with_flat({"lora_rank": cap})


def _adapter_info(adapter, config: QuantConfig, plan: list[BlockSpec]) -> dict:
    """The report's ``adapter`` entry: the adapter's own (generic: blocks replayed or on recorded
    inputs, layers left float and why) plus the block linears ``scope.skip`` left float."""
    info = dict(adapter.report_info())
    kept = {m.name for b in plan for m in b.linears}
    skips = {s.name: f"matches skip pattern {skipped(s.name, config.scope.skip)!r}" for s in adapter.linears()
             if s.name not in kept and skipped(s.name, config.scope.skip)}
    if skips:
        info.setdefault("name", adapter.family)
        info["not_quantized"] = {**info.get("not_quantized", {}), **skips}
    return info


def _split_codes(codes, rows: slice, layout: str):
    q, sc, z = codes
    if z is None or z.ndim < 2:  # FP4: one tensor scale (nvfp4) or none (mxfp4) for the whole group
        return q[rows], sc[rows], z
    if layout == "reference32":
        srows = slice(rows.start // 32, rows.stop // 32)
        return q[rows], sc[srows], z[srows]
    return q[rows], sc[rows], z[rows]


@torch.no_grad()
def convert(model: nn.Module, calibration: Calibration, kernel: str = AUTO) -> nn.Module:
    """Replaces the layers by ``QuantLinear`` and folds the smoothing factors (in place); then
    ``kernels.use_kernels(model, kernel)`` (``auto``: what loading the saved folder gives).

    With ``adaln="int8"`` the adapter's weight-only layers (adaLN modulation linears), once every
    fold is in them, become ``WeightOnlyInt8Linear``.
    """
    cfg = calibration.config
    for bspec in calibration.plan:
        for g in bspec.groups:
            r = calibration.layers[g.name]
            fold = calibration.folds.get(g.name, g.fold)
            smooth = r.smooth
            if smooth is not None and g.name in calibration.prefolded:
                smooth = None  # already in a later group's rows (folded before it was quantized)
            elif smooth is not None and fold.kind != "on_the_fly":
                apply_fold(model, fold, smooth)
                smooth = None
            input_fold = r.smooth if smooth is None else None  # the factor its input's producer holds
            for spec, rows in _member_rows(model, g):
                lin = model.get_submodule(spec.name)
                whole = rows.start == 0 and rows.stop == r.codes[0].shape[0]
                codes = r.codes if whole else _split_codes(r.codes, rows, cfg.weights.layout)
                up = None if r.lora_up is None else r.lora_up[rows]
                q = QuantLinear.from_linear(lin, cfg.weights, cfg.activations, smooth=smooth, lora_down=r.lora_down,
                                            lora_up=up, codes=codes, input_fold=input_fold,
                                            output_fold=output_fold_vector(lin.out_features,
                                                                           calibration.row_folds.get(spec.name, [])),
                                            rotation=r.rotation, late_activations=cfg.late_activations())
                if r.bias is not None and lin.bias is not None:
                    q.bias.copy_(r.bias[rows])
                q.invalidate()
                model.set_submodule(spec.name, q)
    if cfg.lora.dtype != "float32":  # after every fold: the factors are rounded once, as stored
        from .linear import LORA_DTYPES

        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.set_lora_dtype(LORA_DTYPES[cfg.lora.dtype])
    if cfg.adaln == "int8":
        quantize_weight_only(model, [n for n in adapter_for(model).weight_only_linears()
                                     if not skipped(n, cfg.scope.skip)])
    use_kernels(model, kernel)
    return model


def quantize(model: nn.Module, config: QuantConfig, trajectory: CalibrationRecord | None = None,
             progress: bool = True, kernel: str = AUTO, inplace: bool = False) -> tuple[nn.Module, dict]:
    """prepare + calibrate + convert; returns the quantized model and a JSON-able report."""
    t0 = time.perf_counter()
    canonical(kernel)  # before the work
    if config.late.enabled:
        timestep_source(model, config)  # a family whose timestep ditas cannot read: refused before the work
    model.eval()
    if not inplace:
        model = copy.deepcopy(model)
    cal = calibrate(model, config, trajectory, progress)
    float_dtypes = {s.name: model.get_submodule(s.name).weight.dtype for s in cal.specs}
    t1 = time.perf_counter()
    convert(model, cal, kernel)
    t2 = time.perf_counter()
    model.quant_config = config
    model.quant_family = adapter_for(model).family
    use_step_precision(model)
    return model, make_report(cal, {"convert_s": t2 - t1, "total_s": t2 - t0}, _layer_bytes(model, float_dtypes))


def _layer_bytes(model: nn.Module, float_dtypes: dict[str, torch.dtype]) -> dict[str, dict[str, int]]:
    """Each quantized layer's stored bytes and its float weight's (``layer_size.module_bytes``)."""
    from .layer_size import module_bytes

    return {name: module_bytes(model.get_submodule(name), dtype) for name, dtype in float_dtypes.items()
            if isinstance(model.get_submodule(name), QuantLinear)}


def rank_warnings(cal: Calibration) -> list[str]:
    """One line per group whose LoRA rank was capped (report.json's ``warnings``; the CLI prints them)."""
    return [f"warning: {name}: LoRA rank {asked} would store at least as many bytes as the float weight; "
            f"capped to {used}" for name, (asked, used) in cal.rank_caps.items()]


def make_report(cal: Calibration, extra_timings: dict[str, float],
                layer_bytes: dict[str, dict[str, int]] | None = None) -> dict:
    cfg = cal.config
    layers = {name: r.summary() for name, r in cal.layers.items()}
    for name, (_, used) in cal.rank_caps.items():
        layers[name]["lora_rank"] = used
    outs = [r.rel_out_err for r in cal.layers.values()]
    return {
        "recipe": cfg.recipe,
        "bits": {"weights": cfg.weights.bits, "activations": cfg.activations.bits},
        "config": cfg.to_dict(),
        "num_layers": len(cal.layers),
        "mean_rel_output_error": sum(outs) / len(outs),
        "forward_passes": cal.forward_passes,
        "wall_time_s": {k: round(v, 3) for k, v in {**cal.timings, **extra_timings}.items()},
        "peak_memory_mb": round(_peak_rss_mb(), 1),
        "layers": layers,
        "layer_bytes": layer_bytes or {},
        "warnings": rank_warnings(cal),
        **({"adapter": cal.adapter_info} if cal.adapter_info else {}),
    }

