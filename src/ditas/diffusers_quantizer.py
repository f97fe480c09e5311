"""ditas as a diffusers quantization method (``quant_method: "ditas"``), so that diffusers' own
``save_pretrained`` / ``from_pretrained`` round-trip a ditas-quantized transformer.

How diffusers' backends (torchao, gguf, ...) plug in, and what ditas does at each hook:

- ``diffusers.quantizers.auto`` maps a ``quant_method`` to a config class and a quantizer class
  (``AUTO_QUANTIZATION_CONFIG_MAPPING``, ``AUTO_QUANTIZER_MAPPING``); ``register`` adds ``"ditas"``
  to both. ``install`` (called by ``import ditas``) does that the moment diffusers' module is
  imported (an import hook), so ``import ditas`` does not pay for importing diffusers (~2.7 s).
- Saving: ``ModelMixin.save_pretrained`` writes ``config.json`` (with the ``quantization_config``
  registered in the model's config: the family and ditas' own ``quantization`` table, the same
  as in a ditas folder) and asks the model's ``hf_quantizer`` for the state dict to write:
  ``get_state_dict_and_metadata`` packs the codes and compacts the zero points as
  ``save_quantized`` does. ``attach`` gives a model quantized by ditas (``quantize_`` or
  ``load_quantized``) that config and quantizer.
- Loading: ``from_pretrained`` sees ``quantization_config`` in ``config.json``, builds the float
  skeleton on meta, calls ``preprocess_model`` (ditas puts empty ``QuantLinear`` /
  ``WeightOnlyInt8Linear`` modules in place, from the layer table) and then hands every saved
  tensor of those modules to ``create_quantized_param`` (unpacked, in the dtype the file holds:
  diffusers' ``torch_dtype`` cast never touches scales or LoRA factors); ``postprocess_model``
  checks nothing stayed empty and picks the kernels, as ``load_quantized`` does.
- Where diffusers lacks these hooks, ``attach`` makes the model's ``save_pretrained`` refuse
  with one line instead of writing a folder that would load as uninitialised floats.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from typing import Any

from torch import nn

from .errors import CheckpointError
from .quantization.checkpoint import QUANT_METHOD

_AUTO = "diffusers.quantizers.auto"

@functools.lru_cache(maxsize=None)
def _classes() -> tuple[type, type] | None:
    """(config class, quantizer class), built once against the installed diffusers; None when this
    diffusers has no quantizer hooks ditas can use."""
    try:
        from diffusers.quantizers.base import DiffusersQuantizer
        from diffusers.quantizers.quantization_config import QuantizationConfigMixin
        importlib.import_module(_AUTO).AUTO_QUANTIZER_MAPPING  # noqa: B018 (the hook must exist)
    except (ImportError, AttributeError):
        return None
    return _build_classes(DiffusersQuantizer, QuantizationConfigMixin)


def _build_classes(quantizer_base: type, config_base: type) -> tuple[type, type]:
    from enum import Enum

    import torch

    from .quantization.checkpoint import (READABLE_VERSIONS, _config_of, put_quant_layers, unpack_block_scales,
                                          unpack_qweight)
    from .quantization.kernels import AUTO, use_kernels
    from .quantization.step_precision import use_step_precision
    from .quantization.layer_schema import check_layer_table
    from .quantization.linear import QuantLinear
    from .quantization.weight_only import WeightOnlyInt8Linear
    from .validate import check_scales

    class DitasMethod(str, Enum):  # diffusers reads ``quant_method.value``
        DITAS = QUANT_METHOD

    class DitasQuantizationConfig(config_base):
        """``quantization_config`` of a ditas-quantized diffusers model: the family and ditas'
        ``quantization`` table (format version, formats, one entry per layer)."""

        def __init__(self, family: str, quantization: dict[str, Any], quant_method: str = QUANT_METHOD, **_: Any):
            self.quant_method = DitasMethod.DITAS
            self.family = family
            self.quantization = quantization

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()  # every field is needed to rebuild the layers

    class DitasQuantizer(quantizer_base):
        """Loads and saves ditas' packed layers inside diffusers' ``from_pretrained`` /
        ``save_pretrained`` (see the module docstring for the hooks)."""

        requires_calibration = True
        use_keep_in_fp32_modules = False

        def __init__(self, quantization_config, **kwargs: Any):
            if not kwargs.get("pre_quantized", True):
                raise CheckpointError("ditas quantizes with calibration, not while loading: load the float model, "
                                      "then call ditas.quantize_(model, config)")
            super().__init__(quantization_config, **kwargs)

        def _table(self, source: str) -> dict[str, Any]:
            q = self.quantization_config.quantization
            check_layer_table(q, source)
            if q.get("format_version") not in READABLE_VERSIONS or q.get("qweight_packing") != "packed":
                raise CheckpointError(f"{source}: ditas format version {q.get('format_version')!r} is not readable "
                                      f"by this ditas (it reads {', '.join(map(str, READABLE_VERSIONS))}); "
                                      "upgrade ditas")
            return q

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
                raise CheckpointError("a ditas-quantized model loads onto one device: drop device_map and move "
                                      "the model with .to(device)")

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            put_quant_layers(model, self._table(type(model).__name__), type(model).__name__)
            return model

        def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
            owner = model.get_submodule(param_name.rpartition(".")[0])
            return isinstance(owner, (QuantLinear, WeightOnlyInt8Linear))

        def check_quantized_param_shape(self, *args: Any, **kwargs: Any) -> bool:
            return True  # create_quantized_param checks the unpacked tensor against the layer

        def create_quantized_param(self, model, param_value, param_name: str, target_device, state_dict,
                                   unexpected_keys=None, **kwargs: Any) -> None:
            """Sets one saved tensor of a ditas layer, as the file holds it (``state_dict``: not cast
            to ``torch_dtype``), codes unpacked and uint8 zero points widened, exactly."""
            layer, _, tensor = param_name.rpartition(".")
            module = model.get_submodule(layer)
            value = state_dict[param_name]
            expected = module._buffers[tensor]
            if tensor == "qweight" and isinstance(module, QuantLinear):
                value = unpack_qweight(param_name, self.quantization_config.quantization["layers"][layer], value,
                                       type(model).__name__)
            elif tensor == "wscale" and isinstance(module, QuantLinear):
                value = unpack_block_scales(param_name, self.quantization_config.quantization["layers"][layer], value,
                                            type(model).__name__)
            elif tensor == "wzero" and value.dtype == torch.uint8:
                value = value.to(expected.dtype)
            if tuple(value.shape) != tuple(expected.shape) or value.dtype != expected.dtype:
                raise CheckpointError(f"{param_name} is {tuple(value.shape)} {value.dtype} in the file, expected "
                                      f"{tuple(expected.shape)} {expected.dtype}")
            module._buffers[tensor] = value.to(target_device).clone(memory_format=torch.contiguous_format)

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
            if empty:
                raise CheckpointError(f"{type(model).__name__}: {empty[0]} was not restored from the file")
            check_scales(dict(model.state_dict()), type(model).__name__)
            model.quant_config = _config_of(self.quantization_config.quantization.get("config", {}))
            model.quant_family = self.quantization_config.family
            use_kernels(model, AUTO)
            use_step_precision(model)
            return model

        def get_state_dict_and_metadata(self, state_dict, safe_serialization: bool = False):
            from .quantization.checkpoint import packed_state

            layers = self.quantization_config.quantization["layers"]
            return packed_state(layers, state_dict), {}

        @property
        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return DitasQuantizationConfig, DitasQuantizer


def register(auto: Any = None) -> bool:
    """Adds ``"ditas"`` to diffusers' quantizer tables (``auto``: the module
    ``diffusers.quantizers.auto``); False when this diffusers has no such tables."""
    auto = auto if auto is not None else sys.modules.get(_AUTO)
    classes = _classes()
    if auto is None or classes is None:
        return False
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD], auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = classes
    return True


class _RegisterOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers ditas right after ``diffusers.quantizers.auto`` is executed, whenever the user
    imports diffusers, so that ``import ditas`` never imports it."""

    def __init__(self) -> None:
        self.loader = None

    def find_spec(self, name, path, target=None):
        if name != _AUTO or self.loader is not None:
            return None
        sys.meta_path.remove(self)  # one shot; the real finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return None
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register(module)


def install() -> None:
    """Called by ``import ditas``: registers now if diffusers' quantizer module is loaded, else
    when it is (nothing at all if diffusers is not installed)."""
    if _AUTO in sys.modules:
        register()
    elif importlib.util.find_spec("diffusers") is not None and \
            not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def attach(model: nn.Module) -> None:
    """Makes diffusers' ``save_pretrained`` of a ditas-quantized diffusers model write a folder that
    ``from_pretrained`` loads back quantized (``quantization_config`` + ``hf_quantizer``); where
    this diffusers cannot, its ``save_pretrained`` refuses with one line. No-op for other models."""
    if not callable(getattr(model, "register_to_config", None)) or "diffusers" not in sys.modules:
        return
    from .model.adapters.registry import adapter_for
    from .quantization.checkpoint import quantization_meta

    classes = _classes()
    if classes is None or not register(sys.modules.get(_AUTO)):
        model.save_pretrained = functools.partial(_refuse_save, model)
        return
    config_cls, quantizer_cls = classes
    config = config_cls(family=adapter_for(model).family, quantization=quantization_meta(model))
    model.register_to_config(quantization_config=config)
    model.hf_quantizer = quantizer_cls(config, pre_quantized=True)


def _refuse_save(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    import diffusers

    raise CheckpointError(f"this diffusers ({diffusers.__version__}) has no quantizer hooks to save a "
                          f"ditas-quantized {type(model).__name__}: save it with ditas.save_quantized(model, dir) "
                          "and load it with ditas.load_quantized(dir)")
