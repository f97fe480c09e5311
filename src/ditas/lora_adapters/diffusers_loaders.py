"""diffusers' Flux LoRA loader on quantized transformers (imported once diffusers' loaders are).

``FluxLoraLoaderMixin.load_lora_weights`` widens LoRA factors for Flux Control checkpoints
(``_maybe_expand_lora_state_dict``) and looks up ``<module>.weight`` in the transformer's state dict
for every LoRA'd module: a ``QuantLinear`` holds ``qweight`` instead, and the lookup raises
``KeyError``. A quantized linear's input width is fixed, so there is nothing to widen: ditas passes
the keys of quantized modules through unchanged and leaves every other key to diffusers.
"""

from __future__ import annotations

from ..quantization.linear import QuantLinear

_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


def quantized_module_names(model) -> set[str]:
    """Names of the modules that are (or wrap, as a peft layer) a ``QuantLinear``."""
    names = set()
    for name, module in model.named_modules():
        base = module.get_base_layer() if callable(getattr(module, "get_base_layer", None)) else module
        if isinstance(base, QuantLinear):
            names.add(name.removesuffix(".base_layer"))
    return names


def register() -> None:
    """Wraps ``FluxLoraLoaderMixin._maybe_expand_lora_state_dict`` once (where this diffusers has it)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    original = FluxLoraLoaderMixin.__dict__.get("_maybe_expand_lora_state_dict")
    if not isinstance(original, classmethod) or getattr(original.__func__, "ditas_original", None) is not None:
        return
    expand = original.__func__

    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):
        quantized, prefix = quantized_module_names(transformer), f"{cls.transformer_name}."

        def on_quantized(key: str) -> bool:
            module = key.removeprefix(prefix)
            for suffix in _SUFFIXES:
                module = module.removesuffix(suffix)
            return key.startswith(prefix) and module in quantized

        held = {k: v for k, v in lora_state_dict.items() if on_quantized(k)}
        out = expand(cls, transformer, {k: v for k, v in lora_state_dict.items() if k not in held})
        out.update(held)
        return out

    _maybe_expand_lora_state_dict.ditas_original = expand
    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(_maybe_expand_lora_state_dict)
