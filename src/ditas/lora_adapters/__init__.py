"""LoRA adapters (peft, diffusers' ``load_lora_weights``) on ditas' quantized linears.

peft picks a LoRA layer class for each targeted module through its dispatchers
(``peft.tuners.lora.model.LoraModel._create_new_module``) and knows no ``QuantLinear``: without
ditas' dispatcher ``add_adapter`` / ``load_lora_weights`` raise ``Target module QuantLinear(...) is
not supported``. ``peft_layer`` holds the LoRA layer for ``QuantLinear`` and its dispatcher.

Importing peft takes seconds, so ``import ditas`` does not: :func:`install` registers the dispatcher
at once where peft's LoRA model is already imported, and otherwise when it is (a one-shot import
hook, removed once it fired); nothing happens where peft is not installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

PEFT_LORA_MODEL = "peft.tuners.lora.model"  # the module whose dispatch ditas extends


def install() -> None:
    """Registers ditas' LoRA dispatcher now (peft's LoRA model imported) or when peft is imported."""
    if PEFT_LORA_MODEL in sys.modules:
        from .peft_layer import register

        register()
    elif importlib.util.find_spec("peft") is not None and not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds ``peft.tuners.lora.model`` as the normal finders do and registers ditas' dispatcher right
    after the module has run; removes itself from ``sys.meta_path`` when it fires."""

    def find_spec(self, name, path, target=None):
        if name != PEFT_LORA_MODEL:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from .peft_layer import register

            register()

        spec.loader.exec_module = exec_module  # this spec's own loader object
        return spec
