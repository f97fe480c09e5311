"""LoRA adapters (peft, diffusers' ``load_lora_weights``) on ditas' quantized linears.

peft picks a LoRA layer class for each targeted module through its dispatchers
(``peft.tuners.lora.model.LoraModel._create_new_module``) and knows no ``QuantLinear``: without
ditas' dispatcher ``add_adapter`` / ``load_lora_weights`` raise ``Target module QuantLinear(...) is
not supported``. ``peft_layer`` holds the LoRA layer for ``QuantLinear`` and its dispatcher;
``diffusers_loaders`` lets diffusers' Flux LoRA loader pass quantized linears (it looks up a
``.weight`` that a ``QuantLinear`` does not have).

Importing peft and diffusers' loaders takes seconds, so ``import ditas`` does not: :func:`install`
registers each extension at once where its module is already imported, and otherwise right after
it is (a one-shot import hook per module, removed once it fired); nothing happens where the
package is not installed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

# module ditas extends -> the ditas module whose ``register()`` extends it
EXTENSIONS = {"peft.tuners.lora.model": "ditas.lora_adapters.peft_layer",
              "diffusers.loaders.lora_pipeline": "ditas.lora_adapters.diffusers_loaders"}


def install() -> None:
    """Registers each extension now (its module imported) or when its module is imported."""
    for target, extension in EXTENSIONS.items():
        if target in sys.modules:
            importlib.import_module(extension).register()
        elif (importlib.util.find_spec(target.split(".")[0]) is not None
              and not any(isinstance(f, _AfterImport) and f.target == target for f in sys.meta_path)):
            sys.meta_path.insert(0, _AfterImport(target, extension))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``target`` as the normal finders do and runs ``extension.register()`` right after the
    module has run; removes itself from ``sys.meta_path`` when it fires."""

    def __init__(self, target: str, extension: str):
        self.target, self.extension = target, extension

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, extension = spec.loader.exec_module, self.extension

        def exec_module(module):
            run(module)
            importlib.import_module(extension).register()

        spec.loader.exec_module = exec_module  # this spec's own loader object
        return spec
