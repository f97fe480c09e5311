"""peft's LoRA layer for ditas' ``QuantLinear`` (imported only once peft is; see ``__init__``).

Two routes, both exact about the 4-bit weight (never dequantized, never re-quantized):

- **beside the product** (the default, what ``load_lora_weights`` / ``add_adapter`` /
  ``set_adapters`` give): the layer's output is the ``QuantLinear``'s own (integer kernel, ditas'
  low-rank branch included) plus ``scaling * lora_B(lora_A(dropout(x)))`` computed from the float
  input in the adapter's dtype, as peft computes it on a float model. The adapter sees the same
  input as on the FP model, any number of adapters can be active with any weights, and switching
  them changes nothing in the prepared integer weight.
- **fused** (``merge`` = diffusers' ``fuse_lora``): the adapter's ranks are concatenated onto
  ditas' own low-rank branch (``lora_down`` gets ``lora_A * smooth``, ``lora_up`` gets
  ``scaling * lora_B``), so the rank rows ride in the integer product as int8 limbs
  (``kernels.integer.lora_limbs``): one product, no extra float matmul on the input. ditas'
  branch reads the *quantized* input, so the fused adapter sees ``Q_A(x)`` instead of ``x``:
  it differs from the unfused one by the adapter applied to the activations' quantization
  error (zero for 16-bit activations). ``unmerge`` puts back the exact tensors that were there.

Smoothing folds (``quantization.folds``): where ditas folded a factor ``s`` into the producer of
a layer's input, the layer receives ``x / s`` and the adapter reads ``x * input_fold``; where a
fold divided a layer's output rows (the ``to_v`` before an attention output projection, an
adaLN modulation linear), the adapter's output is divided by ``output_fold``. Fused, the same
factors go into the appended ranks (``A diag(input_fold)``, ``diag(1 / output_fold) B``). A
float linear whose rows a fold divided gets ``FoldedLoraLinear`` (peft's layer, compensated); a
layer of a folder that did not record its fold (format < 4) takes no adapter (re-quantize).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from peft.tuners.lora.layer import Linear, LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..errors import ConfigError
from ..quantization.folds import FOLD_UNKNOWN, fold_factors
from ..quantization.linear import QuantLinear


class _FoldedAdapters:
    """What an adapter on a layer that a smoothing fold changed (``quantization.folds``) does, shared
    by the quantized and the float LoRA layer: it reads ``x * input_fold`` (the layer receives
    ``x / s``) and adds its output divided by ``output_fold`` (the layer's rows changed by
    ``1 / s``), so that it adds what it adds on the float model; plain LoRA only."""

    def resolve_lora_variant(self, *, config, **kwargs):
        """Plain LoRA only: DoRA and the other variants rescale the (quantized or folded) weight itself."""
        variants = [name for name in ("use_dora", "use_qalora") if getattr(config, name, False)]
        if variants or getattr(config, "velora_config", None) is not None:
            raise ConfigError(f"ditas' quantized linears take plain LoRA adapters, not {variants or 'VeLoRA'}")
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer, then each active adapter on the float input (none once merged)."""
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self._adapter_output(name, x).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
                             ) -> torch.Tensor:
        """peft's per-sample adapters (``adapter_names``), with the folds compensated."""
        result = self.base_layer(x, *args, **kwargs)
        for name in set(adapter_names):
            if name in self.lora_A:
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                result[rows] = result[rows] + self._adapter_output(name, x[rows]).to(result.dtype)
        return result

    def _adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling * lora_B(lora_A(dropout(x * input_fold))) / output_fold`` in the adapter's dtype."""
        a = self.lora_A[name]
        s_in, s_out = fold_factors(self.get_base_layer())
        x = x.to(a.weight.dtype)
        if s_in is not None:
            x = x * s_in.to(x)
        y = self.lora_B[name](a(self.lora_dropout[name](x))) * self.scaling[name]
        return y if s_out is None else y / s_out.to(y)

    def folded_delta(self, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down * input_fold, up / output_fold): the factors as the folded layer must apply them."""
        s_in, s_out = fold_factors(self.get_base_layer())
        if s_in is not None:
            down = down * s_in.to(down)[None, :]
        if s_out is not None:
            up = up / s_out.to(up)[:, None]
        return down, up


class QuantLoraLinear(_FoldedAdapters, nn.Module, LoraLayer):
    """A LoRA adapter beside a ``QuantLinear`` (peft's ``LoraLayer`` protocol: ``lora_A``,
    ``lora_B``, ``scaling``, ``merge``/``unmerge``); see the module docstring for the routes."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        if config.lora_bias:
            raise ConfigError("LoRA adapters on ditas' quantized linears take no lora_bias (set lora_bias=False)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._fused_stack: list[tuple[Any, Any, int]] = []  # ditas' branch before each merge (unmerge restores)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        """A ``QuantLinear``'s sizes (peft's generic lookup would warn "unsupported layer type")."""
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        """Device of the scales; dtype of the bias (the compute dtype), so peft casts new adapters to it."""
        bias = base_layer.bias
        return base_layer.wscale.device, None if bias is None or not bias.is_floating_point() else bias.dtype

    # -- fused: ranks appended to ditas' own low-rank branch ---------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's float weight delta ``scaling * B @ A`` (out, in), as peft defines it, for what
        the layer receives: ``diag(1 / output_fold) (scaling * B @ A) diag(input_fold)``."""
        down, up = self.folded_delta(self.lora_A[adapter].weight, self.lora_B[adapter].weight * self.scaling[adapter])
        return up @ down

    def fused_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) in fp32 to append to ditas' branch, which reads ``x / smooth``: ``A * smooth``
        and ``scaling * B``, so that ``(x / smooth) down^T up^T = scaling * x A^T B^T``; with the
        folds (``folded_delta``) ``A diag(input_fold)`` and ``diag(1 / output_fold) B``."""
        layer = self.get_base_layer()
        down = self.lora_A[adapter].weight.detach().float()
        if layer.smooth is not None:
            down = down * layer.smooth.float()[None, :]
        up = self.lora_B[adapter].weight.detach().float() * self.scaling[adapter]
        down, up = self.folded_delta(down, up)
        if getattr(layer, "rotation", 0):  # the branch reads the rotated input: (x / smooth) H^T
            from ..quantization.rotation import rotate_weight

            down = rotate_weight(down, layer.rotation)
        return down.to(layer.wscale.device), up.to(layer.wscale.device)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Appends each adapter's ranks to ditas' low-rank branch (diffusers' ``fuse_lora``)."""
        layer = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            down, up = self.fused_factors(name)
            if safe_merge and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ConfigError(f"LoRA adapter {name!r} holds NaN or inf: not fused")
            self._fused_stack.append((layer.lora_down, layer.lora_up, layer.lora_rank))
            if layer.lora_rank:
                down = torch.cat([layer.lora_down.float(), down])
                up = torch.cat([layer.lora_up.float(), up], dim=1)
            set_low_rank(layer, down, up)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Puts back ditas' low-rank branch exactly as it was before each merge (``unfuse_lora``)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            self.merged_adapters.pop()
            set_low_rank(self.get_base_layer(), *self._fused_stack.pop()[:2])

    def __repr__(self) -> str:
        return "lora.QuantLoraLinear(" + super().__repr__().split("(", 1)[1]


def set_low_rank(layer: QuantLinear, down: torch.Tensor | None, up: torch.Tensor | None) -> None:
    """Gives ``layer`` the low-rank branch (down, up) (None, None: none) and drops its prepared
    kernel state, so the integer kernels prepare their LoRA limbs again at the next forward."""
    layer.invalidate()
    layer.lora_down, layer.lora_up = down, up
    layer.lora_rank = 0 if down is None else down.shape[0]


class FoldedLoraLinear(_FoldedAdapters, Linear):
    """peft's LoRA on a float ``nn.Linear`` whose output rows a smoothing fold divided (a modulation
    linear, or a float ``prev_rows`` target): the adapter's output, and its merged delta, divided
    by the layer's ``output_fold`` rows."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        if config.lora_bias:
            raise ConfigError("LoRA adapters on layers ditas folded a smoothing factor into take no lora_bias "
                              "(set lora_bias=False)")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """peft's ``scaling * B @ A`` with the rows divided by ``output_fold`` (what merging adds)."""
        delta = super().get_delta_weight(adapter)
        return (delta.float() / fold_factors(self.get_base_layer())[1].float()[:, None]).to(delta.dtype)


def dispatch_quantlinear(target: nn.Module, adapter_name: str, config, **kwargs: Any) -> nn.Module | None:
    """peft dispatcher: a ``QuantLoraLinear`` for a ``QuantLinear`` target, a ``FoldedLoraLinear``
    for a float linear whose rows a fold divided; None for anything else (peft's own layers). A
    layer of an older folder whose fold was not recorded is refused (its adapter would be wrong)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if kwargs.get("parameter_name") is not None:
        return None
    if getattr(base, FOLD_UNKNOWN, False):
        raise ConfigError("this layer was quantized by an older ditas (format < 4) that did not record the smoothing "
                          "factor folded around it, so a LoRA adapter on it would be wrong: re-quantize the model")
    if isinstance(base, QuantLinear):
        return QuantLoraLinear(target, adapter_name, config=config, **kwargs)
    if type(base) is nn.Linear and fold_factors(base)[1] is not None:
        return FoldedLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def register() -> None:
    """Puts :func:`dispatch_quantlinear` first in peft's LoRA dispatch (once; peft's own
    dispatchers still handle every other module)."""
    from peft.tuners.lora.model import LoraModel

    original = LoraModel._create_new_module
    if getattr(original, "ditas_original", None) is not None:
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = dispatch_quantlinear(target, adapter_name, lora_config, **kwargs)
        return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

    _create_new_module.ditas_original = original
    LoraModel._create_new_module = staticmethod(_create_new_module)
