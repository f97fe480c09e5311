"""Picks the adapter of a model, and the adapter of a family named in a checkpoint.

A family registers its adapter class with ``register``; ``adapter_for(model)`` returns the first
registered adapter whose ``matches`` accepts the model. Families whose adapters need optional
packages (diffusers) are imported lazily so that ``import ditas`` stays light.
"""

from __future__ import annotations

import importlib

from torch import nn

from ...errors import ConfigError
from .base import ModelAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {}
# family modules imported on first use (module path relative to this package)
_LAZY = (".dit", ".diffusers_dit", ".pixart", ".sd3", ".flux", ".generic")
_loaded = False


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Registers an adapter class (usable as a decorator); its ``family`` must be unique."""
    if not cls.family:
        raise ValueError(f"{cls.__name__} has no family name")
    _ADAPTERS[cls.family] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _LAZY:
        try:
            importlib.import_module(mod, __package__)
        except ImportError as exc:  # a family module not written yet, or its optional package missing
            if getattr(exc, "name", None) not in (f"{__package__}{mod}", "diffusers"):
                raise


def families() -> list[str]:
    _load_all()
    return list(_ADAPTERS)


def adapter_class(family: str) -> type[ModelAdapter]:
    _load_all()
    if family not in _ADAPTERS:
        raise ConfigError(f"unknown model family {family!r}; known: {', '.join(_ADAPTERS)}")
    return _ADAPTERS[family]


GENERIC = "generic"
STRUCTURE_ATTR = "_ditas_generic_structure"  # where the generic adapter keeps a model's structure


def hand_written_adapter(model: nn.Module) -> ModelAdapter | None:
    """The first registered hand-written adapter whose ``matches`` accepts ``model`` (None: none)."""
    _load_all()
    for cls in _ADAPTERS.values():
        if cls.matches(model):
            return cls(model)
    return None


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter describing ``model``: the generic one where the model was quantized through it
    (its structure is on the model, or a loaded folder says so), else the hand-written one that
    matches, else the generic one (which asks for a recorded call when it needs the structure)."""
    if isinstance(model, ModelAdapter):
        return model
    _load_all()
    generic = _ADAPTERS[GENERIC]
    if getattr(model, STRUCTURE_ATTR, None) is not None or getattr(model, "quant_family", None) == GENERIC:
        return generic(model)
    return hand_written_adapter(model) or generic(model)


def text_to_image_transformers() -> tuple[str, ...]:
    """The diffusers transformer classes of the text-to-image pipelines ditas quantizes (the
    registered adapters that say so; one list, kept by the adapters)."""
    _load_all()
    return tuple(cls.class_name for cls in _ADAPTERS.values() if getattr(cls, "text_to_image", False))
