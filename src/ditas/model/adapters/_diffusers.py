"""What the diffusers families share: matching by class, the JSON config, building on meta.

A diffusers transformer is quantized in place inside its own class, so the checkpoint only has
to remember the class name and its ``config`` (``model_config``); ``build`` makes the same float
architecture from them, and the quantized layers are put in place before any memory is allocated.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from torch import nn

from ...errors import CheckpointError
from .base import BlockCall, BlockSpec, Fold, LinearSpec, ModelAdapter, ON_THE_FLY, SmoothGroup, TimestepInput


def diffusers_class(name: str) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CheckpointError(f"this diffusers ({diffusers.__version__}) has no {name}")
    return cls


def jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return v


class DiffusersAdapter(ModelAdapter):
    """Base of the adapters for diffusers transformer classes (``class_name``)."""

    class_name: ClassVar[str] = ""
    text_to_image: ClassVar[bool] = False  # the transformer of a text-to-image pipeline ditas quantizes

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(c.__name__ == cls.class_name and c.__module__.startswith("diffusers")
                   for c in type(model).__mro__)

    def model_config(self) -> dict[str, Any]:
        cfg = {k: jsonable(v) for k, v in dict(self.model.config).items()
               if not k.startswith("_") and k != "quantization_config"}  # ditas' own table says that
        return {"class": self.class_name, "config": cfg}

    @classmethod
    def build(cls, config: dict[str, Any]) -> nn.Module:
        if config.get("class") != cls.class_name or not isinstance(config.get("config"), dict):
            raise CheckpointError(f"not a {cls.class_name} model config: {sorted(config)}")
        return diffusers_class(cls.class_name).from_config(config["config"])

    timestep_range: ClassVar[float] = 1000.0  # the timestep the pipelines pass: DDPM units (Flux: [0, 1])

    def timestep_input(self) -> TimestepInput | None:
        """The model's own ``timestep`` argument (pipelines pass it by keyword; by position it is
        where the class's ``forward`` declares it)."""
        params = list(inspect.signature(type(self.model).forward).parameters)[1:]  # without self
        if "timestep" not in params:
            return None
        return TimestepInput("", params.index("timestep"), "timestep", self.timestep_range)

    # -- helpers for the subclasses -----------------------------------------------------------------
    def has(self, name: str) -> bool:
        try:
            return isinstance(self.model.get_submodule(name), nn.Linear)
        except AttributeError:
            return False

    def group(self, block: str, index: int, rels: list[str], role: str, fold: Fold = ON_THE_FLY) -> SmoothGroup | None:
        """The group of the linears ``rels`` of ``block`` that exist (None if none do)."""
        members = tuple(LinearSpec(f"{block}.{r}", index, r, role) for r in rels if self.has(f"{block}.{r}"))
        return SmoothGroup(members, role, fold) if members else None

    @staticmethod
    def spec(name: str, index: int, stack: str, groups: list[SmoothGroup | None]) -> BlockSpec:
        return BlockSpec(name, index, stack, tuple(g for g in groups if g is not None))

    def adaln(self, target: str, shift: int, scale: int) -> Fold:
        """An ``adaln_rows`` fold into the modulation linear ``target`` whose output is
        ``out_features // dim`` equal chunks (``dim``: the width of what it modulates)."""
        lin = self.model.get_submodule(target)
        dim = self.model.config.num_attention_heads * self.model.config.attention_head_dim
        return Fold("adaln_rows", target, num_chunks=lin.out_features // dim, shift_chunk=shift, scale_chunk=scale)


def joint_next_call(call: BlockCall, output: Any) -> BlockCall:
    """Next call of a two-stream block returning ``(encoder_hidden_states, hidden_states)`` and
    called with keywords (SD3 joint blocks, Flux double and single blocks)."""
    encoder, hidden = output
    args, kwargs = list(call.args), dict(call.kwargs)
    for pos, name, value in ((0, "hidden_states", hidden), (1, "encoder_hidden_states", encoder)):
        if name in kwargs or len(args) <= pos:
            kwargs[name] = value
        else:
            args[pos] = value
    return BlockCall(tuple(args), kwargs)
