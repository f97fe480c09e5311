"""One FP sampling run that records what the first block sees at every step.

Data-free calibration (method.md section 3): the FP model samples N calibration labels (one noise
each, classifier-free guidance, the inference step count). We record, per step, the first
block's call (for DiT: the tokens entering it and the conditioning vector ``c``, both CFG halves). Every layer's FP
inputs are then recomputed block by block from these (``blockwise.py``), so calibration costs one
sampling run plus about one more model pass, instead of one sampling run per layer.

``self_calibration`` runs it for any family whose adapter describes the model as a
class-conditional sampler (``ModelAdapter.calibration_sampler``); ``check_record`` checks a given
trajectory against the config it is used with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..diffusion.run import SamplingSettings, sampling_run
from ..errors import CalibrationError
from ..model.adapters.base import BlockCall, CalibrationRecord, ModelAdapter


@dataclass
class Trajectory(CalibrationRecord):
    """A class-conditional model's own calibration run: block-0 calls per step (first step,
    highest t, first), with the settings it was sampled with."""

    labels: list[int] = field(default_factory=list)
    cfg_scale: float = 0.0
    sampler: str = "ddpm"
    seed: int = 0
    final: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.key = trajectory_key(self.labels, self.seed, len(self.calls), self.cfg_scale, self.sampler)

    @property
    def model_forward_calls(self) -> int:
        return self.model_calls

    @property
    def tokens(self) -> list[torch.Tensor]:
        """The tokens entering the first block, per step ((B, T, D); B = 2N with guidance)."""
        return [c.args[0] for c in self.calls]

    @property
    def cond(self) -> list[torch.Tensor]:
        """The conditioning vector per step ((B, D))."""
        return [c.args[1] for c in self.calls]


def trajectory_key(labels, seed: int, steps: int, cfg_scale: float | None, sampler: str) -> tuple:
    """What identifies a self-calibration run: two runs with equal keys record the same calls."""
    return tuple(labels), seed, steps, float(cfg_scale or 0.0), sampler


def self_calibration(adapter: ModelAdapter, config, progress: bool = True) -> Trajectory:
    """The model's own FP calibration run with ``config``'s labels, steps, guidance scale, sampler
    and seed; a family that cannot sample on its own is a ``CalibrationError`` asking for a recording."""
    own = adapter.calibration_sampler()
    if own is None:
        raise CalibrationError(f"a {adapter.family or type(adapter.model).__name__} model cannot sample its own "
                               "calibration run: record one with ditas.record_calibration(model) around a run "
                               "of your pipeline and pass it as calib")
    c = config.calibration
    return record_trajectory(own.model, config.labels_for(own.num_classes), c.steps, c.cfg_scale,
                             c.sampler, c.seed, progress=progress, first_block=own.first_block,
                             layer_names=[own.linear_prefix + s.name for s in adapter.linears()])


def check_record(adapter: ModelAdapter, record: CalibrationRecord, config) -> None:
    """A self-calibration trajectory (one with a ``key``) must have been sampled with ``config``'s
    calibration settings; records of the user's pipeline (no key) are taken as they are."""
    own = adapter.calibration_sampler() if record.key is not None else None
    if own is None:
        return
    c = config.calibration
    expected = trajectory_key(config.labels_for(own.num_classes), c.seed, c.steps, c.cfg_scale, c.sampler)
    if record.key != expected:
        raise CalibrationError("the given trajectory was recorded with other calibration settings")


def _finite_guard(model: nn.Module, layer_names: list[str], step: list[int]) -> list:
    """Forward hooks that raise CalibrationError on the first non-finite layer input or output."""
    handles = []
    for name in layer_names:
        module = model.get_submodule(name)

        def hook(mod, args, out, name=name):
            for what, t in (("input", args[0]), ("output", out)):
                if not torch.isfinite(t).all():
                    raise CalibrationError(f"non-finite {what} (NaN or inf) at layer {name}, calibration step "
                                           f"{step[0]}: the FP model itself is broken on its own samples")
        handles.append(module.register_forward_hook(hook))
    return handles


@torch.no_grad()
def record_trajectory(model: nn.Module, labels: list[int], steps: int, cfg_scale: float, sampler: str = "ddpm",
                      seed: int = 0, layer_names: list[str] | None = None, progress: bool = True,
                      first_block: nn.Module | None = None) -> Trajectory:
    """Samples ``labels`` with the FP model and records the call of ``first_block`` (the model's
    first transformer block) at every step.

    The run is ``diffusion.run.sampling_run`` (noise of sample i from (seed, i)), so the
    calibration samples are those ``ditas sample`` would draw for the same labels and seed.
    """
    if first_block is None:  # the model's adapter says which block is first
        raise CalibrationError("the model has no blocks to calibrate")
    t0 = time.perf_counter()
    y = torch.as_tensor(labels, dtype=torch.long)
    settings = SamplingSettings(steps=steps, cfg_scale=cfg_scale, sampler=sampler, seed=seed)
    calls: list[BlockCall] = []
    step = [0]

    def record(mod, args, kwargs):
        calls.append(BlockCall(tuple(args), dict(kwargs)).detached())

    handles = [first_block.register_forward_pre_hook(record, with_kwargs=True)]
    handles += _finite_guard(model, layer_names or [], step)
    n_calls = [0]

    def wrap(model_fn):
        def fn(x, t):
            n_calls[0] += 1
            out = model_fn(x, t)
            if not torch.isfinite(out).all():
                raise CalibrationError(f"non-finite model output (NaN or inf) at calibration step {step[0]}")
            return out
        return fn

    x = None
    try:
        with tqdm(total=steps, desc="calibration: FP sampling run", unit="step", disable=not progress,
                  leave=False) as bar:
            for i, x in sampling_run(model, y, settings, wrap=wrap):
                step[0] = i + 1
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
    return Trajectory(calls, model_calls=n_calls[0], wall_time_s=time.perf_counter() - t0, labels=list(labels),
                      cfg_scale=float(cfg_scale or 0.0), sampler=sampler, seed=seed, final=x[: len(labels)])
