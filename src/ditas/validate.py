"""Checks that turn silent garbage into one-line errors: options, weights, and predictions.

Small functions with one job each, called from one line in the CLI, the loaders and the sampler,
so that they stay put when those modules move: ``sampling_problems`` (steps, guidance scale, eta,
seed), ``check_finite_state`` (a state dict with a NaN or inf, named), and ``FiniteGuard`` (a
model function that stops a sampling run at the first non-finite prediction, naming the step and
the first layer that produced it).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, DitasError

NUM_TIMESTEPS = 1000  # the training schedule every DiT is respaced from
# torch generators take seeds below 2**64. Sample noise goes through SeedSequence([seed, i]) (any size);
# the seeds derived by adding to a seed (diffusers pipelines: seed + batch start; training and the
# digit classifier: seed + 1) stay below 2**64 with this bound; the search's token subsample wraps
# its seed to 64 bits (calibration/blockwise.subsample_index).
MAX_SEED = 2 ** 63 - 2 ** 32


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def seed_problem(seed: Any, name: str = "--seed") -> str | None:
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        return f"{name} must be an integer in 0..{MAX_SEED}, got {seed!r}"
    return None


def steps_problem(steps: Any, name: str = "--steps", num_timesteps: int = NUM_TIMESTEPS) -> str | None:
    if not is_int(steps) or not 2 <= steps <= num_timesteps:
        return (f"{name} must be an integer in 2..{num_timesteps} (sampling respaces the "
                f"{num_timesteps} training timesteps), got {steps!r}")
    return None


def cfg_scale_problem(cfg_scale: Any, name: str = "--cfg-scale") -> str | None:
    if cfg_scale is None:
        return None
    if not is_number(cfg_scale) or not math.isfinite(cfg_scale) or not 0 <= cfg_scale <= 100:
        return f"{name} must be a number in 0..100 (<= 1: no guidance), got {cfg_scale!r}"
    return None


def eta_problem(eta: Any, name: str = "--eta") -> str | None:
    if not is_number(eta) or not math.isfinite(eta) or not 0 <= eta <= 1:
        return f"{name} must be a number in 0..1 (0: deterministic DDIM, 1: DDPM-like noise), got {eta!r}"
    return None


def sampling_problems(steps: Any = 2, cfg_scale: Any = None, eta: Any = 0.0, seed: Any = 0) -> list[str]:
    """What is wrong with the options of one sampling run (empty: nothing)."""
    found = [steps_problem(steps), cfg_scale_problem(cfg_scale), eta_problem(eta), seed_problem(seed)]
    return [p for p in found if p]


def check_sampling_options(**options: Any) -> None:
    """``ConfigError`` naming every bad option among ``steps``, ``cfg_scale``, ``eta``, ``seed``."""
    problems = sampling_problems(**options)
    if problems:
        raise ConfigError("; ".join(problems))


def check_finite_state(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuses a checkpoint with a NaN or inf in any floating-point tensor, naming the first."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = t[~torch.isfinite(t)].flatten()[0].item()
            count = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {name} holds {count} non-finite value(s) (first: {bad}); "
                                  "the checkpoint is corrupt")


class FiniteGuard:
    """Wraps the model function of one sampling run; stops at the first non-finite prediction.

    On a bad prediction it re-runs that one call with forward hooks to find the first module (in
    execution order) whose output is not finite, then raises a ``DitasError`` naming the step,
    the timestep and that module. The check costs one ``isfinite`` per step; the search only runs
    on failure.
    """

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 num_steps: int, what: str = "sampling"):
        self.model, self.fn, self.num_steps, self.what = model, fn, num_steps, what
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.fn(x, t)
        self.calls += 1
        if not bool(torch.isfinite(out).all()):
            where = "the input" if not bool(torch.isfinite(x).all()) else first_non_finite_module(self.model, self.fn, x, t)
            raise DitasError(f"{self.what} step {self.calls} of {self.num_steps} (model timestep {int(t.flatten()[0])}): "
                             f"the model's prediction is not finite (first non-finite output: {where}); "
                             "no output written")
        return out


def first_non_finite_module(model: nn.Module, fn: Callable, x: torch.Tensor, t: torch.Tensor) -> str:
    """The name of the first module whose output is not finite when ``fn(x, t)`` runs."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, _inputs, output):
        if not found and isinstance(output, torch.Tensor) and output.is_floating_point() \
                and not bool(torch.isfinite(output).all()):
            found.append(names.get(module) or type(module).__name__)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            fn(x, t)
    finally:
        for h in handles:
            h.remove()
    return f"layer {found[0]}" if found else "the guidance combination (every layer's output is finite)"


def state_config_problem(config: Any, state: Mapping[str, torch.Tensor]) -> str | None:
    """How a DiT config disagrees with the tensor shapes of its weights (None: it does not).

    Checked before the model is built, so a config edited to ``depth: 100000`` fails at once and
    names the number in the file and the number in the weights."""
    import re

    if not all(hasattr(config, k) for k in ("depth", "hidden_size", "in_channels", "patch_size")):
        return None  # not a DiT config (another model family): its loader checks the keys
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks and max(blocks) + 1 != config.depth:
        return f"the config says depth {config.depth}, the weights hold {max(blocks) + 1} blocks"
    pe = state.get("x_embedder.proj.weight")
    if pe is not None and pe.ndim == 4:
        for name, have in (("hidden_size", pe.shape[0]), ("in_channels", pe.shape[1]), ("patch_size", pe.shape[2])):
            if getattr(config, name) != have:
                return f"the config says {name} {getattr(config, name)}, the weights have {have}"
    return None


# ----------------------------------------------------------------------------------------------
#                                  Quantized model folders
# ----------------------------------------------------------------------------------------------

# The entries of a folder's layer table are checked by ``quantization.layer_schema.check_layer_table``
# (the one description of what a saved layer holds).


# A quantized layer's dequantized weights ``(code - zero) * scale`` must stay far from float32's
# overflow: with |w| <= 2^40, inputs up to 2^40 and K <= 2^17 a product sum stays below 2^97 (float32
# ends at 2^128). Trained weights are O(1); no ditas quantizer comes near either bound.
MAX_WEIGHT_MAGNITUDE = 2.0 ** 40
# zero points are integers within int32 (a constant row of value v gets z = -v / 1e-8, so |z| can
# exceed the codes by far); the integer kernels' corrections in int64 cannot overflow then
MAX_ZERO_POINT = 2 ** 31 - 1
_MAX_CODE = 255  # codes of <= 8-bit weights


def quant_params_problem(scale: torch.Tensor, zero: torch.Tensor | None = None) -> str | None:
    """What makes a layer's weight scales / zero points give garbage on some kernel (None: nothing).

    Every kernel must compute the same function, so the bounds are those of the strictest one:
    scales finite and positive, zero points integers within ``MAX_ZERO_POINT``, and every
    dequantized weight within ``MAX_WEIGHT_MAGNITUDE``. Called on a folder's tensors at load and
    by the kernels on what they prepare."""
    s = scale.detach().double()
    if not bool(torch.isfinite(s).all()):
        return f"holds non-finite scale(s) (first: {s[~torch.isfinite(s)].flatten()[0].item():g})"
    if bool((s <= 0).any()):
        return f"holds {int((s <= 0).sum())} scale(s) <= 0 (smallest {float(s.min()):g}); scales must be positive"
    reach = torch.full_like(s, float(_MAX_CODE))
    if zero is not None:
        z = zero.detach().double()
        if z.shape != s.shape:
            return None  # the loader's shape check names it
        bad = ~torch.isfinite(z) | (z != z.round()) | (z.abs() > MAX_ZERO_POINT)
        if bool(bad.any()):
            return (f"holds zero point(s) that are not integers within +-{MAX_ZERO_POINT} "
                    f"(first: {z[bad].flatten()[0].item():g})")
        reach = reach + z.abs()
    big = s * reach > MAX_WEIGHT_MAGNITUDE
    if bool(big.any()):
        return (f"holds scale(s) that make dequantized weights exceed {MAX_WEIGHT_MAGNITUDE:g} "
                f"(largest scale {float(s.max()):g}): products would overflow")
    return None


def check_scales(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Weight scales and zero points of quantized layers (``quant_params_problem``), named by
    layer and tensor, so a folder that would give garbage on one kernel is refused on all."""
    for name, t in state.items():
        if not name.endswith(".wscale") or not t.is_floating_point():
            continue
        layer = name[: -len(".wscale")]
        zero = state.get(f"{layer}.wzero")
        problem = quant_params_problem(t, zero)
        if problem:
            tensor = name if zero is None or "scale" in problem else f"{layer}.wzero"
            raise CheckpointError(f"{source}: layer {layer}: tensor {tensor} {problem}")


# ----------------------------------------------------------------------------------------------
#                      Arguments checked before the long work (issue 19)
# ----------------------------------------------------------------------------------------------

MAX_LABEL = 2 ** 31 - 1  # class labels become int64 tensors and embedding indices; larger is a typo
ACTIVATION_COPIES = 8  # live (tokens x width) float tensors of one block call: input, qkv (3), MLP hidden (4)
GiB = 2 ** 30


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB"


def finite_problem(value: Any, name: str, low: float | None = None) -> str | None:
    """A number option that must be finite (and at least ``low``): None when it is, or unset."""
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(value) or (low is not None and value < low):
        bound = f" >= {low:g}" if low is not None else ""
        return f"{name} must be a finite number{bound}, got {value!r}"
    return None


def labels_problem(labels: Any, name: str = "--classes") -> str | None:
    """Class labels before the model is known: integers in 0..MAX_LABEL (a larger one overflows the
    int64 label tensor; the model's own range is checked once it is loaded)."""
    for v in labels:
        if not is_int(v) or not 0 <= v <= MAX_LABEL:
            return f"{name}: label {v!r:.40} is out of range (labels lie in 0..{MAX_LABEL})"
    return None


def min_samples_problem(num: int, k: int, name: str = "--num") -> str | None:
    """Precision and recall with k nearest neighbours need more than k samples."""
    if num <= k:
        return f"{name} {num}: precision and recall (k={k} nearest neighbours) need at least {k + 1} images"
    return None


def available_memory(device: torch.device | str | None) -> tuple[int, str]:
    """Bytes free for new tensors on ``device`` and where that number comes from (CUDA: the free
    device memory; otherwise the kernel's MemAvailable, or the free physical pages)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {dev}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "of RAM available"
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of RAM free"


def memory_problem(need: int, device: torch.device | str | None, what: str, how: str) -> str | None:
    """``what`` needs about ``need`` bytes (estimated as ``how``): a problem when that is more than
    ``device`` has free. The estimate is a lower bound, so a refused run could not have finished."""
    limit, where = available_memory(device)
    if need > limit:
        return f"{what} needs at least {gib(need)} ({how}), more than the {gib(limit)} {where}"
    return None


def activation_bytes(batch: int, tokens: int, width: int, copies: int = ACTIVATION_COPIES) -> int:
    """Float32 activations of one transformer block call: ``copies`` (tokens x width) tensors per sample."""
    return batch * tokens * width * copies * 4


def check_problems(*problems: str | None, error: type[DitasError] = ConfigError) -> None:
    """Raises ``error`` naming every problem given (None entries are no problem)."""
    found = list(dict.fromkeys(p for p in problems if p))  # one recipe's problem said once
    if found:
        raise error("; ".join(found))


def world_env_problem(env: Mapping[str, str]) -> str | None:
    """``WORLD_SIZE`` > 1 must come with what ``torchrun`` sets beside it (RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); a stray ``WORLD_SIZE`` otherwise waits for peers that never come."""
    text = env.get("WORLD_SIZE", "1")
    if not text.strip().isdigit() or int(text) < 1:
        return f"WORLD_SIZE={text!r} is not a process count; unset it or start the command with torchrun"
    if int(text) == 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k, "").strip()]
    if missing:
        return (f"WORLD_SIZE={text} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                "start several processes with torchrun, or unset WORLD_SIZE")
    for key in ("RANK", "LOCAL_RANK"):
        value = env[key].strip()
        if not value.isdigit() or int(value) >= int(text):
            return f"{key}={value!r} is not in 0..{int(text) - 1} (WORLD_SIZE={text})"
    return None


def path_problem(value: Any, name: str, optional: bool = False) -> str | None:
    """A path argument of the Python API: a str or os.PathLike (None only when ``optional``)."""
    import os

    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value.strip()):
        return f"{name} must be a path (str or os.PathLike), got {value!r:.60}"
    return None


def type_problem(value: Any, types: type | tuple[type, ...], name: str, what: str) -> str | None:
    """``value`` must be an instance of ``types`` (``what`` says which, for the message)."""
    if not isinstance(value, types):
        return f"{name} must be {what}, got {type(value).__name__}"
    return None


def _dit_geometry(model: nn.Module) -> tuple[int, int, int] | None:
    """(tokens, hidden size, image side in pixels) of a ditas DiT; None for other families."""
    c = getattr(model, "config", None)
    try:
        tokens = (c.input_size // c.patch_size) ** 2
        side = c.input_size * (8 if c.space == "latent" else 1)  # the SD VAE upsamples 8x
        return tokens, c.hidden_size, side
    except (AttributeError, TypeError, ZeroDivisionError):
        return None


def calibration_memory_problem(model: nn.Module, config: Any, device: Any) -> str | None:
    """A DiT's self-calibration holds one block's inputs for every label (both guidance halves) at
    every step: refused when that alone would not fit ``device`` (``--calib-labels 100000000``)."""
    geometry = _dit_geometry(model)
    if geometry is None or not hasattr(config, "calibration"):
        return None
    tokens, hidden, _ = geometry
    c = config.calibration
    labels = len(c.labels) if isinstance(c.labels, tuple) else c.labels
    images = labels * (2 if (c.cfg_scale or 0) > 1 else 1)
    need = activation_bytes(images, tokens, hidden) + images * c.steps * tokens * hidden * 4
    return memory_problem(need, device, f"calibration on {labels} labels",
                          f"{images} images x {c.steps} steps x {tokens} tokens x {hidden} channels, float32")


def images_memory_problem(model: nn.Module, num: int, copies: int, what: str) -> str | None:
    """``copies`` sets of ``num`` uint8 RGB images held in RAM at once (compare keeps every recipe's)."""
    geometry = _dit_geometry(model)
    if geometry is None:
        return None
    side = geometry[2]
    need = copies * num * side * side * 3
    return memory_problem(need, "cpu", what, f"{copies} x {num} images of {side}x{side}x3 bytes")
