"""Step-dependent activation precision: the quantized layers take their late-step activation format
at the low-noise steps (``QuantConfig.late``).

Why: at W4A4 the error that moves the sample distribution lies at the last steps. On the default
model, ``ditas_w4a4`` with 8-bit activations below t = 400 (20 of 50 steps) comes within 1.0 of
FP's domain FID, where 4-bit activations at every step miss by 3.3 (docs/quantization.md, "Late
steps at 8 bits"). On the integer kernels the two formats cost the same (4-bit codes already run
in int8 products); the weights and the low-rank branch are one copy for every step.

How: one forward pre-hook (``LateStepSwitch``) on the module where the family's adapter says the
timestep enters (``ModelAdapter.timestep_input``: DiT's timestep embedder, a diffusers
transformer's own call) reads the timestep of every model call and sets ``at_late_step`` on each
``QuantLinear`` with a late format, before any of them runs. A call is late when all of its
timesteps are below ``late.below`` of the family's timestep range (the samplers call a batch at
one timestep). Under ``torch.compile`` the hook runs eagerly (``torch.compiler.disable``, with
the reason): the compiled model keeps one graph per phase around it, so ``fullgraph=True`` is
refused for a model with late steps (tests: compiled equals eager at both phases). The switch is state of the model (its layers and the
hook), not of ditas; a copy of the model carries its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..model.adapters.base import TimestepInput
from ..model.adapters.generic import wants_generic
from ..model.adapters.registry import hand_written_adapter
from .linear import QuantLinear


class LateStepSwitch:
    """The pre-hook: ``at_late_step`` of ``layers`` from the timestep of each call of the module
    ``source.module`` (late: every timestep below ``threshold``, in the model's units)."""

    def __init__(self, layers: list[QuantLinear], source: TimestepInput, below: float):
        self.layers = layers
        self.source = source
        self.threshold = below * source.range

    def timestep(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        t = self.source.read(args, kwargs)
        if t is None:
            s = self.source
            raise ConfigError(f"late-step precision reads the timestep from argument {s.keyword or s.position} of "
                              f"{s.module or 'the model'}'s call, which this call lacks")
        return t

    @torch.compiler.disable(reason="ditas' late-step switch reads the timestep's value: compile without fullgraph=True")
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        late = bool((torch.as_tensor(self.timestep(args, kwargs)) < self.threshold).all())
        for m in self.layers:
            m.at_late_step = late


def timestep_source(model: nn.Module, config: Any) -> TimestepInput:
    """Where ``model``'s timestep enters, for a config with late steps (a one-line error where
    ditas does not know: the generic adapter, or a family without a timestep argument)."""
    hand = None if wants_generic(model, config) else hand_written_adapter(model)
    source = None if hand is None else hand.timestep_input()
    if source is None:
        raise ConfigError(f"late-step activation precision (late_below) needs to know where the timestep enters a "
                          f"{type(model).__name__}; ditas knows it for its hand-written families (DiT, diffusers "
                          "DiT, PixArt, SD3, Flux), not through the generic adapter")
    return source


def remove_step_precision(model: nn.Module) -> None:
    """Takes ``model``'s switch off (its layers keep the phase they are in)."""
    for m in model.modules():
        for key in [k for k, h in m._forward_pre_hooks.items() if isinstance(h, LateStepSwitch)]:
            del m._forward_pre_hooks[key]
            m._forward_pre_hooks_with_kwargs.pop(key, None)


def use_step_precision(model: nn.Module) -> LateStepSwitch | None:
    """Attaches the switch of ``model``'s layers with a late-step format, from the model's
    ``quant_config`` (replacing any switch it had); None when no layer has one."""
    remove_step_precision(model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.late_activation_format is not None]
    for m in layers:
        m.at_late_step = False
    if not layers:
        return None
    config = getattr(model, "quant_config", None)
    if not getattr(getattr(config, "late", None), "enabled", False):
        raise ConfigError("the model's layers have late-step activations but its quant_config sets no late_below")
    source = timestep_source(model, config)
    switch = LateStepSwitch(layers, source, config.late.below)
    model.get_submodule(source.module).register_forward_pre_hook(switch, with_kwargs=True)
    return switch
