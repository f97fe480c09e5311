"""The verbs: ``prepare`` (which layers), ``calibrate`` (one FP run + block-wise search),
``convert`` (replace layers, fold smoothing) and ``quantize`` (all three).

    model, report = quantize(load_dit(), recipe_config("ditas"))

``calibrate`` never changes the model (it only reads the FP model); ``convert`` changes it in
place. A ``Trajectory`` can be shared between recipes with the same calibration settings.
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
from ..calibration.trajectory import Trajectory, record_trajectory
from ..errors import CalibrationError, ConfigError
from ..model.dit import quantizable_linear_names
from .config import QuantConfig
from .linear import QuantLinear
from .search import LayerQuant, quantize_layer
from .smoothing import fold_into_adaln, fold_weight_v_rows, v_rows
from .weight_only import quantize_adaln_weight_only

_ROLE_OF = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}


@dataclass
class LayerSpec:
    name: str         # qualified, e.g. blocks.3.attn.qkv
    block: int
    rel: str          # within the block, e.g. attn.qkv
    role: str         # qkv | proj | fc1 | fc2


@dataclass
class Calibration:
    """The outcome of ``calibrate``: per-layer results plus what it cost."""

    config: QuantConfig
    layers: dict[str, LayerQuant]
    specs: list[LayerSpec]
    timings: dict[str, float] = field(default_factory=dict)
    forward_passes: dict[str, float] = field(default_factory=dict)


def prepare(model: nn.Module, config: QuantConfig) -> list[LayerSpec]:
    """The layers to quantize, read from the model's structure (no fixed depth or layer list)."""
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"expected a QuantConfig, got {type(config).__name__}")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        raise ConfigError("the model has no transformer blocks: nothing to quantize")
    specs = []
    for name in quantizable_linear_names(model):
        parts = name.split(".")
        block, rel = int(parts[1]), ".".join(parts[2:])
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            raise ConfigError(f"{name} is quantized already: quantize a float model")
        if not isinstance(module, nn.Linear):
            continue
        role = _ROLE_OF.get(rel)
        if role is None:
            raise ConfigError(f"{name}: unknown layer role {rel!r}")
        specs.append(LayerSpec(name, block, rel, role))
    if not specs:
        raise ConfigError("the model has no quantizable linear layers (qkv/proj/fc1/fc2 as nn.Linear)")
    if config.weight_layout == "reference32":
        bad = [s.name for s in specs if model.get_submodule(s.name).out_features % 32]
        if bad:
            raise ConfigError(f"the reference32 weight layout needs out_features divisible by 32 ({bad[0]})")
    if config.weight_layout == "group":
        bad = [s.name for s in specs if model.get_submodule(s.name).in_features % config.group_size]
        if bad:
            raise ConfigError(f"group size {config.group_size} does not divide the input width of {bad[0]}")
    return specs


def record(model: nn.Module, config: QuantConfig, progress: bool = True) -> Trajectory:
    """The FP calibration run (shareable between configs with the same ``calibration_key``)."""
    labels = config.labels_for(model.num_classes)
    names = [s.name for s in prepare(model, config)]
    return record_trajectory(model, labels, config.steps, config.cfg_scale, config.sampler, config.seed,
                             layer_names=names, progress=progress)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.no_grad()
def calibrate(model: nn.Module, config: QuantConfig, trajectory: Trajectory | None = None,
              progress: bool = True) -> Calibration:
    """Block by block: FP layer inputs, TAS statistics, alpha searches, LoRA fits.

    ``proj`` is handled before ``qkv``: with ``fold_proj_into_v`` its factor divides the V rows of
    ``qkv`` before ``qkv`` is searched and quantized.
    """
    specs = prepare(model, config)
    timings: dict[str, float] = {}
    if trajectory is None:
        trajectory = record(model, config, progress)
        timings["calibration_run_s"] = trajectory.wall_time_s
    else:
        expected = (tuple(config.labels_for(model.num_classes)), config.seed, config.steps,
                    float(config.cfg_scale or 0.0), config.sampler)
        if trajectory.key() != expected:
            raise CalibrationError("the given trajectory was recorded with other calibration settings")
        timings["calibration_run_s"] = 0.0
    t0 = time.perf_counter()
    by_block: dict[int, list[LayerSpec]] = {}
    for s in specs:
        by_block.setdefault(s.block, []).append(s)
    results: dict[str, LayerQuant] = {}
    tokens, cond = trajectory.tokens, trajectory.cond
    order = {r: i for i, r in enumerate(("proj", "fc2", "qkv", "fc1"))}
    n_blocks = len(model.blocks)
    bar = tqdm(total=len(specs), desc="calibration: block-wise search", unit="layer", disable=not progress,
               leave=False)
    for bi in range(n_blocks):
        block = model.blocks[bi]
        layer_specs = sorted(by_block.get(bi, []), key=lambda s: order[s.role])
        inputs, next_tokens = block_layer_inputs(block, f"blocks.{bi}", [s.rel for s in layer_specs], tokens, cond,
                                                 config.search_tokens, config.seed)
        proj_s = None
        for s in layer_specs:
            lin = model.get_submodule(s.name)
            weight, bias, out_scale = lin.weight, lin.bias, None
            if s.role == "qkv" and proj_s is not None:
                weight, bias = fold_weight_v_rows(weight, bias, proj_s)
                out_scale = torch.ones(lin.out_features)
                out_scale[v_rows(lin.out_features)] = proj_s
            r = quantize_layer(s.name, s.role, weight, bias, inputs.pop(s.rel), config, out_scale)
            if s.role == "proj" and r.smooth is not None and config.fold_proj_into_v:
                proj_s = r.smooth
            results[s.name] = r
            bar.update(1)
        if bi + 1 < n_blocks:
            tokens = next_tokens
        del inputs, next_tokens
    bar.close()
    timings["blockwise_search_s"] = time.perf_counter() - t0
    steps = trajectory.steps
    passes = {
        "calibration_sampling_runs": 1,
        "full_model_forward_passes": steps + steps,   # the sampling run + one block-wise pass per step
        "naive_full_model_forward_passes": steps * len(specs),  # one FP observation run per layer
        "batch_per_pass": int(tokens[0].shape[0]) if tokens else 0,
    }
    return Calibration(config, results, specs, timings, passes)


@torch.no_grad()
def convert(model: nn.Module, calibration: Calibration, backend: str = "fake") -> nn.Module:
    """Replaces the layers by ``QuantLinear`` and folds the smoothing factors (in place).

    With ``adaln="int8"`` the adaLN modulation linears, once every fold is in them, become
    ``WeightOnlyInt8Linear``.
    """
    cfg = calibration.config
    by_block: dict[int, dict[str, LayerSpec]] = {}
    for s in calibration.specs:
        by_block.setdefault(s.block, {})[s.role] = s
    for bi, roles in by_block.items():
        block = model.blocks[bi]
        proj = roles.get("proj")
        proj_folded = bool(proj and cfg.fold_proj_into_v and calibration.layers[proj.name].smooth is not None
                           and "qkv" in roles)
        for role, spec in roles.items():
            r = calibration.layers[spec.name]
            lin = model.get_submodule(spec.name)
            smooth = r.smooth
            if smooth is not None and role in ("qkv", "fc1"):
                fold_into_adaln(block, role, smooth)
                smooth = None
            elif smooth is not None and role == "proj" and proj_folded:
                smooth = None  # already in qkv's V rows (folded before qkv was quantized)
            q = QuantLinear.from_linear(lin, wbits=cfg.w_bits, abits=cfg.a_bits, layout=cfg.weight_layout,
                                        group_size=cfg.group_size, act_granularity=cfg.act_granularity,
                                        range_mode=cfg.range_mode, smooth=smooth, lora_down=r.lora_down,
                                        lora_up=r.lora_up, codes=r.codes, backend=backend)
            if r.bias is not None:
                q.bias.copy_(r.bias)
            q.invalidate()
            model.set_submodule(spec.name, q)
    if cfg.adaln == "int8":
        quantize_adaln_weight_only(model)
    return model


def quantize(model: nn.Module, config: QuantConfig, trajectory: Trajectory | None = None, progress: bool = True,
             backend: str = "fake", inplace: bool = False) -> tuple[nn.Module, dict]:
    """prepare + calibrate + convert; returns the quantized model and a JSON-able report."""
    t0 = time.perf_counter()
    model.eval()
    if not inplace:
        model = copy.deepcopy(model)
    cal = calibrate(model, config, trajectory, progress)
    t1 = time.perf_counter()
    convert(model, cal, backend)
    t2 = time.perf_counter()
    return model, make_report(cal, {"convert_s": t2 - t1, "total_s": t2 - t0})


def make_report(cal: Calibration, extra_timings: dict[str, float]) -> dict:
    cfg = cal.config
    layers = {name: r.summary() for name, r in cal.layers.items()}
    outs = [r.rel_out_err for r in cal.layers.values()]
    return {
        "recipe": cfg.recipe,
        "bits": {"weights": cfg.w_bits, "activations": cfg.a_bits},
        "config": cfg.to_dict(),
        "num_layers": len(cal.layers),
        "mean_rel_output_error": sum(outs) / len(outs),
        "forward_passes": cal.forward_passes,
        "wall_time_s": {k: round(v, 3) for k, v in {**cal.timings, **extra_timings}.items()},
        "peak_memory_mb": round(_peak_rss_mb(), 1),
        "layers": layers,
    }

