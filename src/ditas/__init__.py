"""ditas: data-free W4A8 quantization of Diffusion Transformers (DiTAS).

The stages, one package each: ``model`` (DiT, float loading, adapters), ``diffusion`` (schedules,
samplers, image generation), ``calibration`` (the FP model's own trajectory), ``quantization``
(smoothing, alpha search, training-free LoRA, quantized linear, checkpoints), ``evaluation``
(metrics) and ``cli`` (the ``ditas`` command); ``loaders.load_dit`` reads float and quantized
models alike, ``pipelines`` wraps diffusers text-to-image pipelines. ``api`` is the Python API:
``record_calibration``, ``quantize_``, ``use_kernels``, ``sample``, ``save_quantized``,
``load_quantized``, ``recipe_config`` (see ``docs/api.md``); the ``ditas`` commands call it too.
"""

from .errors import CheckpointError, ConfigError, DitasError
from .versions import check_versions as _check_versions

_check_versions("torch")  # an older torch lacks APIs ditas uses: say so now, in one line
from .model.dit import DiT, DiTConfig, DiT_models, dit_config
from .loaders import load_dit
from .model.loading import default_model_path, save_dit
from .quantization.config import QuantConfig
from .model.adapters.base import CalibrationRecord
from .api import (load_quantized, load_vae, quantize_, record_calibration, recipe_config, sample, save_quantized,
                  use_attention, use_kernels, write_quantized)
from .diffusers_quantizer import install as _install_diffusers_quantizer

_install_diffusers_quantizer()  # "ditas" becomes a diffusers quant_method once diffusers is imported
from . import lora_adapters

lora_adapters.install()  # LoRA adapters on quantized linears (registered when peft / diffusers are imported)

__version__ = "0.1.0"

__all__ = ["DiT", "DiTConfig", "DiT_models", "dit_config", "load_dit", "save_dit", "default_model_path",
           "record_calibration", "quantize_", "save_quantized", "write_quantized", "load_quantized", "load_vae",
           "recipe_config", "use_kernels", "use_attention", "sample", "QuantConfig", "CalibrationRecord",
           "DitasError", "CheckpointError", "ConfigError", "__version__"]
