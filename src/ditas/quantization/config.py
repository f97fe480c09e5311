"""``QuantConfig``: every choice of a quantization run, validated when it is built.

The choices come in small nested specs, each validated in its ``__post_init__``:
``weights`` (``WeightFormat``: bits, layout, group size, range mode), ``activations``
(``ActivationFormat``: bits, granularity, range mode), ``smooth`` (``SmoothingSpec``: TAS
smoothing, the alpha search and its loss), ``lora`` (``LoRASpec``) and ``calibration``
(``CalibrationSpec``: the DiT self-calibration run), plus the recipe name and the adaLN storage.
The specs are THE config: code reads ``cfg.weights.bits``, ``cfg.lora.rank``,
``cfg.calibration.steps``. Specs and configs are frozen (hashable, shared without copies); a
changed one is a new one, made by ``dataclasses.replace`` or ``QuantConfig.replace``, which
validate it again: no value reaches the code unvalidated. ``QuantLinear`` takes a
``WeightFormat`` and an ``ActivationFormat``; checkpoints store the nested ``to_dict()``.

Flat names (``w_bits``, ``lora_rank``, ``steps``, ...) exist in ONE table, ``FLAT_NAMES``: the
override names of ``recipes.recipe_config`` (one word per CLI option) and the keys of the flat
dicts older quantized folders hold (read by ``from_dict``). They are not attributes nor keyword
arguments of ``QuantConfig``.

A config holds numbers and names only (no model, no tensors), so it round-trips through JSON.
Named presets live in ``recipes.py``; ``recipe_config("ditas", w_bits=3)`` is the usual way to get one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigError
from ..diffusion.samplers import SAMPLERS
from ..model.adapters.base import ROLES as LAYER_ROLES
from ..validate import cfg_scale_problem, is_int, seed_problem, steps_problem
from .fp4 import FP4_BLOCKS
from .gptq import GPTQ_ORDERS
from .quantizers import ACT_GRANULARITIES, DEFAULT_ACT_GROUP, FORMATS, RANGE_MODES, WEIGHT_LAYOUTS
from .rotation import ROTATIONS

SMOOTHINGS = ("none", "tas")
SEARCH_WEIGHTS = ("auto", "plain", "approx", "shortlist", "exact")
LORA_KEEPS = ("best", "last")
LORA_SVDS = ("auto", "exact", "randomized")
LORA_STORAGE = ("float32", "bfloat16")  # how the fitted LoRA factors are held and saved
ADALN_MODES = ("int8", "float")
WEIGHT_ROUNDINGS = ("nearest", "gptq", "search")  # search: the per-layer search picks one of the two
LORA_ORDERS = ("quantize_first", "svd_first", "search")  # ditas' order, SVDQuant's, or the search's choice

# The 16 ImageNet labels of the reference calibration set (method.md section 3).
REFERENCE_LABELS = (207, 360, 387, 974, 88, 979, 417, 279, 27, 336, 177, 594, 748, 718, 447, 613)


def default_alpha_grid() -> tuple[float, ...]:
    return tuple(round(0.05 * i, 2) for i in range(21))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid quantization config: " + "; ".join(problems))


def _is_fp4(fmt: Any) -> bool:
    """Whether ``fmt`` names an FP4 block format (a value read from a file may be anything)."""
    return isinstance(fmt, str) and fmt in FP4_BLOCKS


def _normalize(spec: Any, name: str, value: Any) -> None:
    """Sets a field of a frozen spec while it is built (lists from JSON become tuples)."""
    object.__setattr__(spec, name, value)


@dataclass(frozen=True)
class WeightFormat:
    """Weights: ``format`` ``int`` (default) or an FP4 block format (``nvfp4``, ``mxfp4``; see
    ``fp4.py``). Integer weights: ``bits`` (2..8); ``layout`` ``channel`` (a scale per output row),
    ``group`` (``group_size`` consecutive inputs) or ``reference32`` (the published grouping); range
    mode ``levels`` ((max-min)/(2^b-1)) or ``reference`` (/2^b). FP4 weights: ``bits`` 4, their
    blocks are groups along the inputs (``layout`` ``group``, ``group_size`` the block: 16 for
    nvfp4, 32 for mxfp4; left at the defaults ``channel``/0 they become that), range mode
    ``levels`` (unused)."""

    bits: int = 4
    layout: str = "channel"
    group_size: int = 0
    range_mode: str = "levels"
    format: str = "int"
    rounding: str = "nearest"   # "gptq": error-compensated rounding (gptq.py); "search": per layer
    gptq_order: str = "natural"  # GPTQ column order: "natural" or "desc" (descending diag of H)

    def __post_init__(self) -> None:
        if _is_fp4(self.format) and (self.layout, self.group_size) == ("channel", 0):
            _normalize(self, "layout", "group")
            _normalize(self, "group_size", FP4_BLOCKS[self.format])
        p = []
        if self.rounding not in WEIGHT_ROUNDINGS:
            p.append(f"weight rounding must be one of {WEIGHT_ROUNDINGS}, got {self.rounding!r}")
        if self.gptq_order not in GPTQ_ORDERS:
            p.append(f"GPTQ order must be one of {GPTQ_ORDERS}, got {self.gptq_order!r}")
        if not (is_int(self.bits) and 2 <= self.bits <= 8):
            p.append(f"weight bits must be an integer in 2..8, got {self.bits!r}")
        if self.layout not in WEIGHT_LAYOUTS:
            p.append(f"weight layout must be one of {WEIGHT_LAYOUTS}, got {self.layout!r}")
        if self.layout == "group" and not (is_int(self.group_size) and self.group_size >= 1):
            p.append(f"group layout needs a positive group size, got {self.group_size!r}")
        if self.range_mode not in RANGE_MODES:
            p.append(f"range mode must be one of {RANGE_MODES}, got {self.range_mode!r}")
        p += _format_problems("weight", self.format, self.bits, self.range_mode,
                              ("layout", self.layout), self.group_size)
        _check(p)


@dataclass(frozen=True)
class ActivationFormat:
    """Dynamic activation quantization: ``bits`` (4..16; 16 = activations stay float),
    ``granularity`` ``tensor`` (as the reference), ``token`` or ``group`` (``group_size``
    consecutive input channels of a token; default 64), range mode as for weights; ``format``
    ``int`` (default) or an FP4 block format (``nvfp4``/``mxfp4``: ``bits`` 4, granularity
    ``group`` with the format's block as ``group_size``).

    Left unset (None), ``granularity`` is ``token`` below 8 bits (with per-tensor 4-bit
    activations the ``ditas`` recipe falls below ``rtn``: issue 23) and ``tensor`` otherwise, ``group`` for FP4; ``group_size``
    is 64, or the FP4 block. An explicit value is kept (``tensor`` at 4 bits stays possible)."""

    bits: int = 8
    granularity: str | None = None
    range_mode: str = "levels"
    format: str = "int"
    group_size: int | None = None

    def __post_init__(self) -> None:
        fp4 = _is_fp4(self.format)
        if self.granularity is None:
            bits_ok = is_int(self.bits)
            _normalize(self, "granularity", "group" if fp4 else "token" if bits_ok and self.bits < 8 else "tensor")
        if self.group_size is None:
            _normalize(self, "group_size", FP4_BLOCKS[self.format] if fp4 else DEFAULT_ACT_GROUP)
        p = []
        if not (is_int(self.bits) and 4 <= self.bits <= 16):
            p.append(f"activation bits must be an integer in 4..16 (16 = not quantized), got {self.bits!r}")
        if self.granularity not in ACT_GRANULARITIES:
            p.append(f"activation granularity must be one of {ACT_GRANULARITIES}, got {self.granularity!r}")
        if not (is_int(self.group_size) and self.group_size >= 1):
            p.append(f"activation group size must be a positive integer, got {self.group_size!r}")
        if self.range_mode not in RANGE_MODES:
            p.append(f"range mode must be one of {RANGE_MODES}, got {self.range_mode!r}")
        p += _format_problems("activation", self.format, self.bits, self.range_mode,
                              ("granularity", self.granularity), self.group_size)
        _check(p)

    def late_format(self, bits: int, granularity: str) -> "ActivationFormat":
        """The INT format of ``bits`` per ``granularity`` that goes with this one at the late steps
        (``QuantConfig.late``): the same range mode, and this format's group size where it is INT
        (an FP4 block is not an INT group: the default group then)."""
        return ActivationFormat(bits, granularity, self.range_mode,
                                group_size=self.group_size if self.format == "int" else None)


def _format_problems(what: str, fmt: Any, bits: Any, range_mode: str, grouping: tuple[str, Any],
                     group_size: Any) -> list[str]:
    """What an FP4 format forbids: other bits, non-block groupings, the reference range mode."""
    if fmt not in FORMATS:
        return [f"{what} format must be one of {FORMATS}, got {fmt!r}"]
    if not _is_fp4(fmt):
        return []
    p, block = [], FP4_BLOCKS[fmt]
    if bits != 4:
        p.append(f"{fmt} {what}s are 4-bit (E2M1), got {what} bits {bits!r}")
    if grouping[1] != "group" or group_size != block:
        p.append(f"{fmt} {what}s are quantized in blocks of {block} input channels ({grouping[0]} group, "
                 f"group size {block}), got {grouping[0]} {grouping[1]!r} with group size {group_size!r}")
    if range_mode != "levels":
        p.append(f"{fmt} has no range mode: leave it at 'levels', got {range_mode!r}")
    return p


@dataclass(frozen=True)
class SmoothingSpec:
    """TAS smoothing and the per-layer alpha search (see ``QuantConfig``)."""

    method: str = "tas"
    roles: tuple[str, ...] = LAYER_ROLES
    alpha: float = 0.5
    search: bool = True
    alpha_grid: tuple[float, ...] = field(default_factory=default_alpha_grid)
    quantize_before_smooth: bool = False
    w_max_from_quantized: bool = False
    fold_proj_into_v: bool = True
    loss_steps: int | None = None
    search_tokens: int | None = 512
    search_weight: str = "auto"
    search_shortlist: int = 3
    search_workers: int | None = None
    bias_correction: bool = False
    rotation: str = "none"  # Hadamard rotation of the inputs (rotation.py): none, hadamard, or search

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            _check([f"rotation must be one of {ROTATIONS}, got {self.rotation!r}"])
        if isinstance(self.roles, (list, str)):
            _normalize(self, "roles", (self.roles,) if isinstance(self.roles, str) else tuple(self.roles))
        if isinstance(self.alpha_grid, list):
            _normalize(self, "alpha_grid", tuple(self.alpha_grid))
        p = []
        if self.method not in SMOOTHINGS:
            p.append(f"smoothing must be one of {SMOOTHINGS}, got {self.method!r}")
        bad_roles = [r for r in self.roles if r not in LAYER_ROLES] if isinstance(self.roles, tuple) else [self.roles]
        if bad_roles:
            p.append(f"smooth roles must be among {LAYER_ROLES}, got {bad_roles}")
        if not _is_num(self.alpha) or not 0 <= self.alpha <= 1:
            p.append(f"alpha must be in [0, 1], got {self.alpha!r}")
        if (not isinstance(self.alpha_grid, tuple) or not self.alpha_grid
                or any(not _is_num(a) or not 0 <= a <= 1 for a in self.alpha_grid)):
            p.append(f"alpha grid must be a non-empty list of values in [0, 1], got {self.alpha_grid!r}")
        if self.loss_steps is not None and not (is_int(self.loss_steps) and self.loss_steps >= 1):
            p.append(f"loss steps must be a positive integer or None, got {self.loss_steps!r}")
        if self.search_tokens is not None and not (is_int(self.search_tokens) and self.search_tokens >= 1):
            p.append(f"search tokens must be a positive integer or None, got {self.search_tokens!r}")
        if self.search_weight not in SEARCH_WEIGHTS:
            p.append(f"search weight must be one of {SEARCH_WEIGHTS}, got {self.search_weight!r}")
        if not (is_int(self.search_shortlist) and self.search_shortlist >= 1):
            p.append(f"search shortlist must be a positive integer, got {self.search_shortlist!r}")
        if self.search_workers is not None and not (is_int(self.search_workers) and self.search_workers >= 1):
            p.append(f"search workers must be a positive integer or None, got {self.search_workers!r}")
        for name in ("search", "quantize_before_smooth", "w_max_from_quantized", "fold_proj_into_v"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"{name.replace('_', ' ')} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.bias_correction, bool):
            p.append(f"bias correction must be true or false, got {self.bias_correction!r}")
        _check(p)


@dataclass(frozen=True)
class LoRASpec:
    """Training-free LoRA: ``rank`` (0: none), ``rounds`` of alternating fits, keep the ``best``
    or the ``last`` round, SVD ``exact``/``randomized`` (``auto``: exact up to 1024); ``dtype``:
    the factors' storage, ``float32`` (as fitted) or ``bfloat16`` (rounded once, after every fold:
    half the LoRA bytes, docs/performance.md measures the cost; the ``ditas`` recipes' choice)."""

    rank: int = 32
    rounds: int = 10
    keep: str = "best"
    svd: str = "auto"
    dtype: str = "float32"
    order: str = "quantize_first"  # absorb.py: quantize then fit (ditas), svd_first (SVDQuant), or search

    def __post_init__(self) -> None:
        p = []
        if self.order not in LORA_ORDERS:
            p.append(f"LoRA order must be one of {LORA_ORDERS}, got {self.order!r}")
        if not (is_int(self.rank) and self.rank >= 0):
            p.append(f"LoRA rank must be a non-negative integer, got {self.rank!r}")
        if not (is_int(self.rounds) and self.rounds >= 1):
            p.append(f"LoRA rounds must be a positive integer, got {self.rounds!r}")
        if self.keep not in LORA_KEEPS:
            p.append(f"LoRA keep must be one of {LORA_KEEPS}, got {self.keep!r}")
        if self.svd not in LORA_SVDS:
            p.append(f"LoRA SVD must be one of {LORA_SVDS}, got {self.svd!r}")
        if self.dtype not in LORA_STORAGE:
            p.append(f"LoRA dtype must be one of {LORA_STORAGE}, got {self.dtype!r}")
        _check(p)


@dataclass(frozen=True)
class CalibrationSpec:
    """The self-calibration run of class-conditional models: ``labels`` (a count or explicit
    labels), ``seed``, ``steps``, guidance ``cfg_scale``, ``sampler``. (Families calibrated from a
    ``record_calibration`` record ignore it.)"""

    labels: int | tuple[int, ...] = 16
    seed: int = 0
    steps: int = 50
    cfg_scale: float = 1.5
    sampler: str = "ddpm"

    def __post_init__(self) -> None:
        if isinstance(self.labels, list):
            _normalize(self, "labels", tuple(self.labels))
        p = []
        if is_int(self.labels):
            if self.labels < 1:
                p.append(f"the number of calibration labels must be at least 1, got {self.labels}")
        elif not (isinstance(self.labels, tuple) and self.labels and all(is_int(v) and v >= 0 for v in self.labels)):
            p.append(f"calibration labels must be a count or a list of non-negative labels, got {self.labels!r}")
        p += [m for m in (seed_problem(self.seed, "calibration seed"), steps_problem(self.steps, "calibration steps"),
                          cfg_scale_problem(self.cfg_scale, "calibration cfg scale")) if m]
        if self.sampler not in SAMPLERS:
            p.append(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        _check(p)


@dataclass(frozen=True)
class LateStepsSpec:
    """Step-dependent activation precision: at the low-noise steps, those whose timestep is below
    ``below`` of the model's timestep range (DDPM's 1000 steps; Flux's [0, 1]), every quantized
    layer's activations use ``a_bits`` bits per ``granularity`` (INT) instead of the config's
    ``activations`` format; the weights and the low-rank branch are the same at every step.
    ``below`` 0 (the default): off. Why: at W4A4 the error that moves the sample distribution lies
    at the last steps (docs/quantization.md, "Late steps at 8 bits"); ``step_precision.py`` switches
    the layers from the timestep the model is called with."""

    below: float = 0.0
    a_bits: int = 8
    granularity: str = "token"

    def __post_init__(self) -> None:
        p = []
        if not _is_num(self.below) or not 0 <= self.below < 1:
            p.append(f"late-steps threshold must be a fraction of the timestep range in [0, 1), got {self.below!r}")
        if not (is_int(self.a_bits) and 4 <= self.a_bits <= 16):
            p.append(f"late-step activation bits must be an integer in 4..16 (16 = float), got {self.a_bits!r}")
        if self.granularity not in ACT_GRANULARITIES:
            p.append(f"late-step activation granularity must be one of {ACT_GRANULARITIES}, got {self.granularity!r}")
        _check(p)

    @property
    def enabled(self) -> bool:
        return self.below > 0


ADAPTER_CHOICES = ("auto", "generic")


@dataclass(frozen=True)
class ScopeSpec:
    """Which layers are quantized and who describes them: ``adapter`` ``auto`` (the model's
    hand-written adapter, the generic one where none exists) or ``generic`` (the generic adapter
    even where a hand-written one exists, e.g. to compare them); ``skip``: fnmatch patterns of
    qualified linear names left in float (listed in the report with the reason)."""

    adapter: str = "auto"
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.skip, (list, str)):
            _normalize(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))
        p = []
        if self.adapter not in ADAPTER_CHOICES:
            p.append(f"adapter must be one of {ADAPTER_CHOICES}, got {self.adapter!r}")
        if not isinstance(self.skip, tuple) or any(not isinstance(v, str) or not v for v in self.skip):
            p.append(f"skip must be a list of name patterns, got {self.skip!r}")
        _check(p)


_SPECS = {"weights": WeightFormat, "activations": ActivationFormat, "smooth": SmoothingSpec, "lora": LoRASpec,
          "calibration": CalibrationSpec, "scope": ScopeSpec, "late": LateStepsSpec}
# The one table of flat names -> (spec, field): the override names of ``recipe_config`` and the
# keys of the flat config dicts older quantized folders hold (``from_dict``). ``range_mode`` sets
# both formats (QuantLinear applies one range mode to weights and activations).
FLAT_NAMES: dict[str, tuple[str, str]] = {
    "w_bits": ("weights", "bits"), "weight_layout": ("weights", "layout"), "group_size": ("weights", "group_size"),
    "range_mode": ("weights", "range_mode"),
    "w_format": ("weights", "format"),
    "a_bits": ("activations", "bits"), "act_granularity": ("activations", "granularity"),
    "a_format": ("activations", "format"), "act_group_size": ("activations", "group_size"),
    "smoothing": ("smooth", "method"), "smooth_roles": ("smooth", "roles"),
    **{n: ("smooth", n) for n in ("alpha", "search", "alpha_grid", "quantize_before_smooth", "w_max_from_quantized",
                                  "fold_proj_into_v", "loss_steps", "search_tokens", "search_weight",
                                  "search_shortlist", "search_workers", "bias_correction", "rotation")},
    "w_rounding": ("weights", "rounding"), "gptq_order": ("weights", "gptq_order"), "lora_order": ("lora", "order"),
    "lora_rank": ("lora", "rank"), "lora_rounds": ("lora", "rounds"), "lora_keep": ("lora", "keep"),
    "lora_svd": ("lora", "svd"), "lora_dtype": ("lora", "dtype"),
    "calib_labels": ("calibration", "labels"), "seed": ("calibration", "seed"), "steps": ("calibration", "steps"),
    "cfg_scale": ("calibration", "cfg_scale"), "sampler": ("calibration", "sampler"),
    "adapter": ("scope", "adapter"), "skip": ("scope", "skip"),
    "late_below": ("late", "below"), "late_a_bits": ("late", "a_bits"), "late_act_granularity": ("late", "granularity"),
}


@dataclass(frozen=True, init=False)
class QuantConfig:
    """How to quantize the four linear layers of every DiT block.

    Each group of choices is a spec; below, ``weights.bits`` is ``cfg.weights.bits``.

    Numerics: ``weights.bits`` (2..8), ``activations.bits`` (4..16, 16 = activations stay float), weight layout
    (``weights.layout`` ``channel``: per output row; ``group``: ``weights.group_size`` consecutive inputs; ``reference32``:
    the published grouping), ``activations.granularity`` (``tensor`` dynamic as the reference,
    ``token`` or ``group`` of ``activations.group_size`` input channels, dynamic; unset: ``token``
    below 8 bits), range mode, one for both (``levels``: (max-min)/(2^b-1); ``reference``: /2^b);
    ``weights.format`` / ``activations.format``: ``int``, or the FP4 block formats ``nvfp4`` /
    ``mxfp4`` (``fp4.py``; 4 bits, blocks of 16 / 32 input channels).

    Smoothing: ``smooth.method`` ``tas`` (temporal-aggregated factors) or ``none``, applied to the
    roles in ``smooth.roles``; ``smooth.alpha`` fixed or searched over ``smooth.alpha_grid`` when ``smooth.search``.
    ``smooth.quantize_before_smooth`` and ``smooth.w_max_from_quantized`` reproduce the reference code;
    ``smooth.fold_proj_into_v`` folds ``proj``'s factor into the V rows of ``qkv`` before ``qkv`` is
    quantized (deployable numerics); otherwise ``proj`` divides its input on the fly.

    Search: loss ``sum_t mean((Y_q - Y_fp)^2)`` over the calibration steps (the first
    ``smooth.loss_steps`` only, if set) on at most ``smooth.search_tokens`` tokens per step (activation ranges
    always come from all tokens). ``smooth.search_weight`` says which weight the search scores:
    ``exact`` (all LoRA rounds per alpha, as the method's definition; ``auto``, the default, is
    ``exact``), ``plain`` (Q_W(W s), no LoRA), ``approx`` (one LoRA round with a randomized rank-r
    SVD) or ``shortlist`` (``approx`` over the grid, then the ``smooth.search_shortlist`` best alphas
    rescored with all LoRA rounds). ``smooth.search_workers`` threads score alphas in parallel (None:
    torch's thread count); it changes the speed, not the result.

    LoRA: ``lora.rank`` (0: none) and ``lora.rounds`` of training-free alternating fits, keeping
    the ``best`` or the ``last`` round (``lora.keep``); ``lora.svd`` exact (LAPACK) or randomized (auto: exact
    when the smaller side of the weight is at most 1024); ``lora.dtype`` the factors' storage
    (``float32`` or ``bfloat16``).

    adaLN storage: ``adaln`` ``int8`` stores the adaLN modulation linears (after the smoothing
    folds) weight-only in int8 per output channel (``weight_only.WeightOnlyInt8Linear``; they are a
    third of DiT-XL/2's weights), ``float`` keeps them as the method does.

    Bias correction (``smooth.bias_correction``, off in every recipe; an extension beyond the method):
    after the search and LoRA, each layer's bias absorbs the mean output error over the
    calibration steps (per output channel), which lowers the loss by exactly that mean's energy.
    Layers without a bias are left as they are.

    Calibration: ``calibration.labels`` (a count or explicit labels), ``.seed``, ``.steps``,
    ``.cfg_scale``, ``.sampler`` of the one FP sampling run.

    Scope: ``scope.adapter`` (``auto`` or ``generic``) and ``scope.skip`` (name patterns kept float).

    Late steps: ``late`` (``LateStepsSpec``, off by default): activations in ``late.a_bits`` bits
    at the timesteps below ``late.below`` of the range (``late_activations()``).
    """

    recipe: str
    weights: WeightFormat
    activations: ActivationFormat
    smooth: SmoothingSpec
    lora: LoRASpec
    calibration: CalibrationSpec
    adaln: str
    scope: ScopeSpec
    late: LateStepsSpec

    def __init__(self, recipe: str = "custom", weights: WeightFormat | None = None,
                 activations: ActivationFormat | None = None, smooth: SmoothingSpec | None = None,
                 lora: LoRASpec | None = None, calibration: CalibrationSpec | None = None, adaln: str = "int8",
                 scope: ScopeSpec | None = None, late: LateStepsSpec | None = None, **unknown: Any):
        """Takes the specs (a missing one: its defaults); a flat name is refused with the way to say it."""
        if unknown:
            raise ConfigError(_unknown_keys_message(sorted(unknown)))
        given = {"weights": weights, "activations": activations, "smooth": smooth, "lora": lora,
                 "calibration": calibration, "scope": scope, "late": late}
        for spec, cls in _SPECS.items():
            value = given[spec] if given[spec] is not None else cls()
            if not isinstance(value, cls):
                raise ConfigError(f"{spec} must be a {cls.__name__}, got {type(value).__name__}")
            object.__setattr__(self, spec, value)
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "adaln", adaln)
        self.__post_init__()

    def __post_init__(self) -> None:
        p = []
        if not isinstance(self.recipe, str):
            p.append(f"recipe must be a name, got {self.recipe!r}")
        if self.adaln not in ADALN_MODES:
            p.append(f"adaLN storage must be one of {ADALN_MODES}, got {self.adaln!r}")
        if self.smooth.quantize_before_smooth and (self.smooth.rotation != "none" or self.weights.rounding != "nearest"
                                                   or self.lora.order != "quantize_first"):
            p.append("quantize-before-smooth (the reference numerics) takes no rotation, GPTQ rounding or "
                     "svd_first low-rank order")
        if self.weights.range_mode != self.activations.range_mode:
            p.append("weights and activations must use one range mode (QuantLinear applies one to both), got "
                     f"{self.weights.range_mode!r} and {self.activations.range_mode!r}")
        if self.late.enabled and not self.activations.bits < self.late.a_bits:
            p.append(f"late-step activations must have more bits than the others ({self.activations.bits}), got "
                     f"{self.late.a_bits}")
        _check(p)

    def late_activations(self) -> ActivationFormat | None:
        """The activation format of the late steps (None: the same format at every step)."""
        if not self.late.enabled:
            return None
        return self.activations.late_format(self.late.a_bits, self.late.granularity)

    def replace(self, **changes: Any) -> "QuantConfig":
        """A copy with whole specs (or ``recipe``/``adaln``) replaced, validated as a new config."""
        return replace(self, **changes)

    def with_flat(self, flat: dict[str, Any]) -> "QuantConfig":
        """A copy with ``FLAT_NAMES`` values set (recipe overrides, old folders), validated."""
        unknown = sorted(set(flat) - set(FLAT_NAMES) - {"recipe", "adaln"})
        if unknown:
            raise ConfigError(f"unknown quantization config keys: {unknown}")
        per_spec: dict[str, dict[str, Any]] = {k: {} for k in _SPECS}
        for name, value in flat.items():
            if name in FLAT_NAMES:
                spec, fname = FLAT_NAMES[name]
                per_spec[spec][fname] = value
        if "range_mode" in flat:
            per_spec["activations"]["range_mode"] = flat["range_mode"]
        _rederive_defaults(per_spec)
        top = {k: flat[k] for k in ("recipe", "adaln") if k in flat}
        specs = {spec: replace(getattr(self, spec), **values) for spec, values in per_spec.items() if values}
        return replace(self, **specs, **top)

    # -- derived ----------------------------------------------------------------------------------
    def smooths(self, role: str) -> bool:
        return self.smooth.method != "none" and role in self.smooth.roles

    def labels_for(self, num_classes: int) -> list[int]:
        """Calibration labels for a model with ``num_classes`` classes.

        A count N gives the reference's 16 ImageNet labels (first N) for 1000-class models, and N
        labels spread evenly over the classes otherwise.
        """
        labels = self.calibration.labels
        if isinstance(labels, tuple):
            bad = [v for v in labels if v >= num_classes]
            if bad:
                raise ConfigError(f"calibration label {bad[0]} is out of range: the model has classes "
                                  f"0..{num_classes - 1}")
            return list(labels)
        n = labels
        if num_classes == 1000 and n <= len(REFERENCE_LABELS):
            return list(REFERENCE_LABELS[:n])
        if n <= num_classes:
            return [(i * num_classes) // n for i in range(n)]
        return [i % num_classes for i in range(n)]

    def calibration_key(self) -> tuple:
        """Settings that determine the FP calibration trajectory (shared between recipes)."""
        c = self.calibration
        return (c.labels, c.seed, c.steps, float(c.cfg_scale), c.sampler)

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The nested form (what checkpoints store)."""
        def plain(d: dict[str, Any]) -> dict[str, Any]:
            return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

        return {"recipe": self.recipe, **{spec: plain(asdict(getattr(self, spec))) for spec in _SPECS},
                "adaln": self.adaln}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """Reads the nested form, or the flat form older quantized folders hold (through ``FLAT_NAMES``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a quantization config must be a table, got {type(data).__name__}")
        known = {"recipe", "adaln", *_SPECS, *FLAT_NAMES}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown quantization config keys: {unknown}")
        nested: dict[str, Any] = {k: data[k] for k in ("recipe", "adaln") if k in data}
        for spec, spec_cls in _SPECS.items():
            if spec in data:
                value = data[spec]
                if not isinstance(value, dict):
                    raise ConfigError(f"quantization config '{spec}' must be a table, got {value!r}")
                names = {f.name for f in fields(spec_cls)}
                bad = sorted(set(value) - names)
                if bad:
                    raise ConfigError(f"unknown keys in quantization config '{spec}': {bad}")
                nested[spec] = spec_cls(**value)
        # the flat form of older folders: the specs' values, then the flat ones (validated as a whole)
        return cls(**nested).with_flat({k: v for k, v in data.items() if k in FLAT_NAMES})


def _rederive_defaults(per_spec: dict[str, dict[str, Any]]) -> None:
    """Flat overrides that change a format's bits or number format without naming the fields that
    follow from them get those fields' defaults again: ``a_bits=4`` alone means per-token
    activations, ``a_format="nvfp4"`` its blocks, ``w_format`` the format's weight layout."""
    a, w = per_spec["activations"], per_spec["weights"]
    if ("bits" in a or "format" in a) and "granularity" not in a:
        a["granularity"] = None
    if "format" in a and "group_size" not in a:
        a["group_size"] = None
    if "format" in w and "layout" not in w and "group_size" not in w:
        w["layout"], w["group_size"] = "channel", 0


def _unknown_keys_message(names: list[str]) -> str:
    """Why a flat keyword is refused, and how to say it (nested spec or ``recipe_config``)."""
    hints = [f"{n} -> {FLAT_NAMES[n][0]}={_SPECS[FLAT_NAMES[n][0]].__name__}({FLAT_NAMES[n][1]}=...)"
             for n in names if n in FLAT_NAMES]
    if hints:
        return ("QuantConfig takes nested specs, not flat names: " + "; ".join(hints)
                + " (or recipe_config(name, " + ", ".join(f"{n}=..." for n in names if n in FLAT_NAMES) + "))")
    return f"unknown quantization config keys: {names}"
