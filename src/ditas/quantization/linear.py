"""``QuantLinear``: a linear layer with integer weight codes, quantized activations and a float
low-rank branch.

Tensors are named for their role (as nunchaku's quantized linear):

- ``qweight``  uint8 (out, in): weight codes in ``[0, 2^bits - 1]`` (unpacked in memory; packed
  to ``weight_format.bits`` only in checkpoints); FP4 weights: E2M1 codes 0..15 (``fp4.py``);
- ``wscale``, ``wzero``: float scale and integer-valued zero point per weight group (see
  ``quantizers.WEIGHT_LAYOUTS`` for the shapes); FP4 weights: ``wscale`` holds the decoded block
  scales (E4M3 or power-of-two values, exact in fp32), there is no ``wzero``, and NVFP4 weights
  hold their fp32 tensor scale as ``wtscale`` (1,);
- ``bias``: float (out,) or absent;
- ``smooth``: float (in,) divisor applied to the input on the fly, or absent (a smoothing factor
  that could not be folded into a preceding layer, e.g. for ``fc2``);
- ``lora_down`` (rank, in), ``lora_up`` (out, rank): the float low-rank branch (fp32 or bf16,
  ``lora_dtype``; computed in fp32 either way), or absent.
- ``rotation`` (an int, not a tensor; 0: none): the block of the Hadamard rotation applied online
  to the (smoothed) input, ``x -> fwht(x / smooth, rotation)`` (``rotation.py``); the codes are
  then those of the rotated weight ``(W s) H^T``, so the float function is unchanged;
- ``late_activation_format`` (a format, not a tensor; None: none): the activations' format at the
  late (low-noise) steps, used while ``at_late_step`` is True (set from the timestep of each model
  call by ``step_precision.py``; ``QuantConfig.late``); the weights are the same at every step;
- ``input_fold`` (in,), ``output_fold`` (out,): records of the smoothing factors folded into the
  producer of the layer's input and into its output rows (``folds``: what a LoRA adapter on the
  layer compensates), or absent; the layer's own forward never reads them.

Compute dtype: the layer takes and returns its input's float dtype (fp32, bf16 or fp16); inside,
every kernel works in fp32 (integer products accumulate exactly, then one float epilogue) and
converts once at the end. ``.to(dtype)`` never casts the layer's tensors (see ``ditas.dtypes``):
they keep the precision the checkpoint declares whatever the model computes in.

The layer computes ``y = Q_A(x / smooth) (W_q + lora_up lora_down)^T + bias`` where ``Q_A`` is
dynamic activation quantization (INT per tensor, per token or per group, or FP4 blocks:
``quantizers.activation_quantizer``). Its ``kernel`` (a name in
``kernels.KERNELS``; given by ``kernels.use_kernels(model, ...)``) decides how: the layer asks that
entry to ``prepare`` it and to compute its ``forward``; it knows no kernel by name. A new layer runs
``"simulated"`` (the float simulation) until its kernels are chosen. All kernels start from the
same activation codes.

One copy of the weight: once a kernel whose state holds the codes (``Kernel.holds_codes``, the
integer kernels) has prepared the layer, the layer drops ``qweight``; reading ``layer.qweight`` (or
its state dict, or saving) re-derives the codes exactly from the prepared form, and moving or
reloading the layer restores them first.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import KERNELS
from .kernels.integer import DEFAULT_LORA_LIMBS
from ..dtypes import device_only
from ..errors import ConfigError
from .config import ActivationFormat, WeightFormat
from .layer_schema import LORA_DTYPES, layer_tensors
from .quantizers import activation_codes, activation_quantizer, dequantize_weight_as, quantize_weight_as
from .rotation import fwht, rotate_weight

# the LoRA factors' storage of a layer built by ``from_linear`` without ``lora_dtype``: as given. The
# ditas recipes round them to bf16 (``LoRASpec.dtype``): half their bytes (66 of the 533 MB of a W4A8
# DiT-XL/2 folder) at a measured -0.07 dB on the default model (docs/performance.md)
DEFAULT_LORA_DTYPE = torch.float32


def check_rotation(rotation: int, in_features: int) -> None:
    """A rotation block is 0 (none) or a power of two dividing the input width."""
    if not (isinstance(rotation, int) and rotation >= 0 and (rotation == 0 or (
            not rotation & (rotation - 1) and in_features % rotation == 0))):
        raise ConfigError(f"rotation must be 0 or a power of two dividing in_features {in_features}, got {rotation!r}")


def check_late_activations(late: ActivationFormat | None, activations: ActivationFormat) -> None:
    """A late-step format is an INT format with more bits than the layer's activations."""
    if late is None:
        return
    if not isinstance(late, ActivationFormat) or late.format != "int" or late.bits <= activations.bits:
        raise ConfigError(f"late-step activations must be an INT ActivationFormat with more bits than "
                          f"{activations.bits}, got {late!r}")
    if late.range_mode != activations.range_mode:
        raise ConfigError(f"one range mode at every step, got {activations.range_mode!r} and {late.range_mode!r}")


def _activation_phrase(a: ActivationFormat) -> str:
    """``A8 dynamic per-tensor``, ``A4 nvfp4 (block 16)``, ``A16 fp``: a format in the layer's repr."""
    if a.bits >= 16:
        act = "fp"
    elif a.format != "int":
        act = f"{a.format} (block {a.group_size})"
    else:
        act = f"dynamic per-{a.granularity}" + (f" {a.group_size}" if a.granularity == "group" else "")
    return f"A{a.bits} {act}"


def _check_lora_dtype(dtype: torch.dtype) -> None:
    if dtype not in LORA_DTYPES.values():
        raise ValueError(f"LoRA factors are stored as {' or '.join(LORA_DTYPES)}, got {dtype}")


class QuantLinear(nn.Module):
    """Linear layer with integer weights in ``weight_format`` and dynamic activations in
    ``activation_format`` (the config's ``WeightFormat``/``ActivationFormat``, validated there)."""

    def __init__(self, in_features: int, out_features: int, weights: WeightFormat, activations: ActivationFormat,
                 *, bias: bool = True, lora_rank: int = 0, has_smooth: bool = False,
                 lora_dtype: torch.dtype = torch.float32, has_input_fold: bool = False, has_output_fold: bool = False,
                 rotation: int = 0, late_activations: ActivationFormat | None = None):
        super().__init__()
        check_rotation(rotation, in_features)
        check_late_activations(late_activations, activations)
        _check_lora_dtype(lora_dtype)
        if not isinstance(weights, WeightFormat) or not isinstance(activations, ActivationFormat):
            raise ConfigError(f"QuantLinear takes a WeightFormat and an ActivationFormat, got "
                              f"{type(weights).__name__} and {type(activations).__name__}")
        if weights.range_mode != activations.range_mode:
            raise ConfigError(f"one range mode for weights and activations, got {weights.range_mode!r} and "
                              f"{activations.range_mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_format, self.activation_format = weights, activations
        self.late_activation_format = late_activations
        self.at_late_step = False  # set per model call by step_precision.LateStepSwitch
        self.lora_rank = lora_rank
        self.rotation = rotation  # Hadamard block of the online input rotation (0: none)
        self.kernel = "simulated"  # a name in kernels.KERNELS; kernels.use_kernels(model, ...) chooses
        # integer kernels: int8 limbs of lora_down appended to the weight (kernels.integer.lora_limbs;
        # 0: the down-projection runs apart in fp32) and whether the float LoRA products run in bf16
        self.lora_limbs = DEFAULT_LORA_LIMBS
        self.lora_bf16 = False
        tensors = layer_tensors(in_features, out_features, weights, bias=bias, smooth=has_smooth,
                                lora_rank=lora_rank, lora_dtype=lora_dtype, input_fold=has_input_fold,
                                output_fold=has_output_fold)  # the saved layer's schema
        for name, spec in tensors.items():
            init = torch.ones if name in ("wscale", "wtscale", "smooth", "input_fold", "output_fold") else torch.zeros
            self.register_buffer(name, None if spec is None else init(spec[0], dtype=spec[1]))
        self._kernel_state = None  # what the kernel prepared (kernels/), not saved

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: WeightFormat, activations: ActivationFormat, *,
                    weight: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                    lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                    codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    lora_dtype: torch.dtype | None = None, input_fold: torch.Tensor | None = None,
                    output_fold: torch.Tensor | None = None, rotation: int = 0,
                    late_activations: ActivationFormat | None = None) -> "QuantLinear":
        """Quantizes ``weight`` (default: ``linear.weight``) in ``weights`` with round-to-nearest
        (min/max for INT, ``fp4.py`` for FP4).

        ``codes`` = (qweight, wscale, wzero) (for FP4: (qweight, wscale, tensor scale or None)) lets a caller supply codes it chose itself (for
        instance the best round of the training-free LoRA); ``weight`` is then ignored.
        ``lora_dtype``: how the LoRA factors are held and saved (default ``DEFAULT_LORA_DTYPE``);
        bf16 rounds them once, here, so the saved model is the one in memory. ``input_fold`` /
        ``output_fold``: the smoothing factors folded around the layer (``folds``; records only).
        ``rotation``: the Hadamard block of the online input rotation (``codes`` must then be those
        of the rotated weight; a given ``weight`` is rotated here). ``late_activations``: the
        activations' format at the late steps (``QuantConfig.late_activations()``), or None.
        """
        rank = 0 if lora_down is None else lora_down.shape[0]
        m = cls(linear.in_features, linear.out_features, weights, activations, bias=linear.bias is not None,
                lora_rank=rank, has_smooth=smooth is not None,
                lora_dtype=DEFAULT_LORA_DTYPE if lora_dtype is None else lora_dtype,
                has_input_fold=input_fold is not None, has_output_fold=output_fold is not None,
                rotation=rotation, late_activations=late_activations)
        if codes is None:
            w = linear.weight.detach() if weight is None else weight.detach()
            if rotation:
                w = rotate_weight(w.float(), rotation)
            codes = quantize_weight_as(w, weights)
        q, s, z = codes
        m.qweight.copy_(q)
        m.wscale.copy_(s)
        third = m.wzero if weights.format == "int" else m.wtscale  # None for mxfp4
        if third is not None:
            third.copy_(z)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        for name, value in (("smooth", smooth), ("input_fold", input_fold), ("output_fold", output_fold)):
            if value is not None:
                getattr(m, name).copy_(value)
        if rank:
            m.lora_down.copy_(lora_down)
            m.lora_up.copy_(lora_up)
        return m.to(linear.weight.device)

    # -- views ------------------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the codes stand for (without the low-rank branch)."""
        f = self.weight_format
        return dequantize_weight_as(self.qweight, self.wscale, self.wzero if f.format == "int" else self.wtscale, f)

    def effective_weight(self) -> torch.Tensor:
        """``W_q + lora_up @ lora_down``: what the layer multiplies the quantized input by."""
        w = self.dequantized_weight()
        if self.lora_rank:
            w = w + self.lora_up.float() @ self.lora_down.float()
        return w

    def set_lora_dtype(self, dtype: torch.dtype) -> None:
        """Holds (and saves) the LoRA factors as ``dtype`` from now on; bf16 rounds them."""
        _check_lora_dtype(dtype)
        if self.lora_rank and self.lora_dtype != dtype:
            self.invalidate()
            self.lora_down = self.lora_down.to(dtype)
            self.lora_up = self.lora_up.to(dtype)

    @property
    def lora_dtype(self) -> torch.dtype | None:
        """How the LoRA factors are held and saved (None without a LoRA branch)."""
        return None if self.lora_down is None else self.lora_down.dtype

    def invalidate(self) -> None:
        """Call after changing any tensor in place: drops what the kernel prepared (the codes are
        restored first if the kernel holds the only copy); the next forward prepares again."""
        self._restore_codes()
        self._kernel_state = None

    # -- kernels: the layer asks its kernel; one copy of the weight ----------------------------------
    @property
    def kernel_entry(self):
        """The registry entry of the layer's kernel (``kernels.KERNELS``)."""
        return KERNELS[self.kernel]

    @property
    def kernel_state(self):
        """What the layer's kernel prepared (None until it has)."""
        return self.__dict__.get("_kernel_state")

    def set_kernel(self, kernel: str) -> None:
        """Uses ``kernel`` from now on (``kernels.use_kernels`` checks the choice) and prepares it now."""
        self.invalidate()
        self.kernel = kernel
        self.prepare_kernel()

    def prepare_kernel(self) -> None:
        """Has the kernel prepare the layer; a kernel that holds the codes becomes their one copy."""
        state = self.kernel_entry.prepare(self)
        self._restore_codes()
        self._kernel_state = state
        if self.kernel_entry.holds_codes:
            del self._buffers["qweight"]

    def _restore_codes(self) -> None:
        state = self.__dict__.get("_kernel_state")
        if "qweight" not in self._buffers and state is not None:
            self._buffers["qweight"] = state.codes()

    def __getattr__(self, name: str):
        if name == "qweight" and "qweight" not in self.__dict__["_buffers"]:
            state = self.__dict__.get("_kernel_state")
            if state is not None:
                return state.codes()  # re-derived (a temporary copy)
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "qweight" not in self._buffers and self._kernel_state is not None:
            destination[prefix + "qweight"] = self._kernel_state.codes()

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the layer; ``.to(dtype)`` (and ``.half()``, ``.type()``, ...) never
        casts it: codes, scales, bias and LoRA factors keep the precision the checkpoint declares
        (``ditas.dtypes``), and the layer computes for inputs of any float dtype. The kernel's
        prepared state is dropped (codes restored first) and prepared again at the next forward."""
        self.invalidate()
        return super()._apply(device_only(fn), recurse)

    def __getstate__(self):
        """Copies and pickles hold the codes, not the kernel's prepared state (oneDNN's packed
        weight cannot be copied); the copy prepares its kernel at its first forward."""
        state = dict(super().__getstate__())
        kernel_state = state.get("_kernel_state")
        if kernel_state is not None:
            buffers = dict(state["_buffers"])
            if "qweight" not in buffers:
                buffers["qweight"] = kernel_state.codes()
            state["_buffers"], state["_kernel_state"] = buffers, None
        return state

    # -- forward ----------------------------------------------------------------------------------
    @property
    def active_activation_format(self) -> ActivationFormat:
        """The activations' format of this call: the late-step format while ``at_late_step``."""
        late = self.late_activation_format
        return late if late is not None and self.at_late_step else self.activation_format

    def activation_formats(self) -> tuple[ActivationFormat, ...]:
        """Every format the layer's activations take (what its kernel must support)."""
        late = self.late_activation_format
        return (self.activation_format,) if late is None else (self.activation_format, late)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / smooth``, then the online Hadamard rotation: what every kernel quantizes."""
        if self.smooth is not None:
            x = x / self.smooth
        if self.rotation:
            x = fwht(x, self.rotation)
        return x

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """Smoothed (and rotated), quantized-dequantized input in any format (what the simulated
        kernel multiplies)."""
        x = self.transform_input(x)
        return activation_quantizer(self.active_activation_format)(x)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Smoothed input -> (codes, scale, zero) of INT per-tensor / per-token activations (what the
        integer kernels multiply); for abits >= 16: (x, None, None)."""
        x = self.transform_input(x)
        a = self.active_activation_format
        if a.bits >= 16:
            return x, None, None
        return activation_codes(x, a.bits, a.granularity, a.range_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in any float dtype; the kernels compute in fp32 and return ``x``'s dtype."""
        if self._kernel_state is None:
            self.prepare_kernel()  # after a move, a reload or a change in place
        return self.kernel_entry.forward(self, x)

    def precision(self) -> str:
        """The layer's precision in one phrase (``W4 per-channel asym, A8 dynamic per-tensor``)."""
        w, late = self.weight_format, self.late_activation_format
        layout = {"channel": "per-channel", "group": f"group{w.group_size}", "reference32": "reference-32"}[w.layout]
        weights = f"W{w.bits} {layout} asym" if w.format == "int" else f"W4 {w.format} (block {w.group_size})"
        late_steps = "" if late is None else f" ({_activation_phrase(late)} at late steps)"
        return f"{weights}, {_activation_phrase(self.activation_format)}{late_steps}"

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", self.precision()]
        if self.lora_rank:
            parts.append(f"lora_rank={self.lora_rank}" + (" (bf16)" if self.lora_dtype == torch.bfloat16 else ""))
        if self.smooth is not None:
            parts.append("smooth=on-the-fly")
        if self.rotation:
            parts.append(f"rotation=hadamard{self.rotation}")
        if self.weight_format.range_mode == "reference":
            parts.append("range=reference(2^b)")
        parts.append(f"kernel={self.kernel}")
        return ", ".join(parts + self.kernel_entry.describe(self))
