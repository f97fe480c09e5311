"""``QuantConfig``: every choice of a quantization run, validated when it is built.

A config holds numbers and names only (no model, no tensors), so it round-trips through JSON
(``to_dict``/``from_dict``) and is stored in the quantized model's ``config.json``. Named presets
live in ``recipes.py``; ``recipe_config("ditas", w_bits=3)`` is the usual way to get one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from .quantizers import ACT_GRANULARITIES, RANGE_MODES, WEIGHT_LAYOUTS

LAYER_ROLES = ("qkv", "proj", "fc1", "fc2")
SMOOTHINGS = ("none", "tas")
SEARCH_WEIGHTS = ("auto", "plain", "approx", "shortlist", "exact")
LORA_KEEPS = ("best", "last")
LORA_SVDS = ("auto", "exact", "randomized")
SAMPLERS = ("ddpm", "ddim")
ADALN_MODES = ("int8", "float")

# The 16 ImageNet labels of the reference calibration set (method.md section 3).
REFERENCE_LABELS = (207, 360, 387, 974, 88, 979, 417, 279, 27, 336, 177, 594, 748, 718, 447, 613)


def default_alpha_grid() -> tuple[float, ...]:
    return tuple(round(0.05 * i, 2) for i in range(21))


@dataclass
class QuantConfig:
    """How to quantize the four linear layers of every DiT block.

    Numerics: ``w_bits`` (2..8), ``a_bits`` (4..16, 16 = activations stay float), weight layout
    (``channel``: per output row; ``group``: ``group_size`` consecutive inputs; ``reference32``:
    the published grouping), activation granularity (``tensor`` dynamic as the reference, or
    ``token`` dynamic), range mode (``levels``: (max-min)/(2^b-1); ``reference``: /2^b).

    Smoothing: ``smoothing`` ``tas`` (temporal-aggregated factors) or ``none``, applied to the
    roles in ``smooth_roles``; ``alpha`` fixed or searched over ``alpha_grid`` when ``search``.
    ``quantize_before_smooth`` and ``w_max_from_quantized`` reproduce the reference code;
    ``fold_proj_into_v`` folds ``proj``'s factor into the V rows of ``qkv`` before ``qkv`` is
    quantized (deployable numerics); otherwise ``proj`` divides its input on the fly.

    Search: loss ``sum_t mean((Y_q - Y_fp)^2)`` over the calibration steps (the first
    ``loss_steps`` only, if set) on at most ``search_tokens`` tokens per step (activation ranges
    always come from all tokens). ``search_weight`` says which weight the search scores:
    ``exact`` (all LoRA rounds per alpha, as the method's definition; ``auto``, the default, is
    ``exact``), ``plain`` (Q_W(W s), no LoRA), ``approx`` (one LoRA round with a randomized rank-r
    SVD) or ``shortlist`` (``approx`` over the grid, then the ``search_shortlist`` best alphas
    rescored with all LoRA rounds). ``search_workers`` threads score alphas in parallel (None:
    torch's thread count); it changes the speed, not the result.

    LoRA: ``lora_rank`` (0: none) and ``lora_rounds`` of training-free alternating fits, keeping
    the ``best`` or the ``last`` round; ``lora_svd`` exact (LAPACK) or randomized (auto: exact
    when the smaller side of the weight is at most 1024).

    adaLN storage: ``adaln`` ``int8`` stores the adaLN modulation linears (after the smoothing
    folds) weight-only in int8 per output channel (``weight_only.WeightOnlyInt8Linear``; they are a
    third of DiT-XL/2's weights), ``float`` keeps them as the method does.

    Bias correction (``bias_correction``, off in every recipe; an extension beyond the method):
    after the search and LoRA, each layer's bias absorbs the mean output error over the
    calibration steps (per output channel), which lowers the loss by exactly that mean's energy.
    Layers without a bias are left as they are.

    Calibration: ``calib_labels`` (a count or explicit labels), ``seed``, ``steps``, ``cfg_scale``,
    ``sampler`` of the one FP sampling run.
    """

    recipe: str = "custom"
    w_bits: int = 4
    a_bits: int = 8
    weight_layout: str = "channel"
    group_size: int = 0
    act_granularity: str = "tensor"
    range_mode: str = "levels"
    smoothing: str = "tas"
    smooth_roles: tuple[str, ...] = LAYER_ROLES
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
    lora_rank: int = 32
    lora_rounds: int = 10
    lora_keep: str = "best"
    lora_svd: str = "auto"
    adaln: str = "int8"
    bias_correction: bool = False
    calib_labels: int | tuple[int, ...] = 16
    seed: int = 0
    steps: int = 50
    cfg_scale: float = 1.5
    sampler: str = "ddpm"

    def __post_init__(self) -> None:
        if isinstance(self.smooth_roles, (list, str)):
            self.smooth_roles = (self.smooth_roles,) if isinstance(self.smooth_roles, str) else tuple(self.smooth_roles)
        if isinstance(self.alpha_grid, list):
            self.alpha_grid = tuple(self.alpha_grid)
        if isinstance(self.calib_labels, list):
            self.calib_labels = tuple(self.calib_labels)
        p: list[str] = []

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (is_int(self.w_bits) and 2 <= self.w_bits <= 8):
            p.append(f"weight bits must be an integer in 2..8, got {self.w_bits!r}")
        if not (is_int(self.a_bits) and 4 <= self.a_bits <= 16):
            p.append(f"activation bits must be an integer in 4..16 (16 = not quantized), got {self.a_bits!r}")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            p.append(f"weight layout must be one of {WEIGHT_LAYOUTS}, got {self.weight_layout!r}")
        if self.weight_layout == "group" and not (is_int(self.group_size) and self.group_size >= 1):
            p.append(f"group layout needs a positive group size, got {self.group_size!r}")
        if self.act_granularity not in ACT_GRANULARITIES:
            p.append(f"activation granularity must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}")
        if self.range_mode not in RANGE_MODES:
            p.append(f"range mode must be one of {RANGE_MODES}, got {self.range_mode!r}")
        if self.smoothing not in SMOOTHINGS:
            p.append(f"smoothing must be one of {SMOOTHINGS}, got {self.smoothing!r}")
        bad_roles = [r for r in self.smooth_roles if r not in LAYER_ROLES]
        if bad_roles:
            p.append(f"smooth roles must be among {LAYER_ROLES}, got {bad_roles}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 <= self.alpha <= 1:
            p.append(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.alpha_grid or any(not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in self.alpha_grid):
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
        if not (is_int(self.lora_rank) and self.lora_rank >= 0):
            p.append(f"LoRA rank must be a non-negative integer, got {self.lora_rank!r}")
        if not (is_int(self.lora_rounds) and self.lora_rounds >= 1):
            p.append(f"LoRA rounds must be a positive integer, got {self.lora_rounds!r}")
        if self.lora_keep not in LORA_KEEPS:
            p.append(f"LoRA keep must be one of {LORA_KEEPS}, got {self.lora_keep!r}")
        if self.lora_svd not in LORA_SVDS:
            p.append(f"LoRA SVD must be one of {LORA_SVDS}, got {self.lora_svd!r}")
        if not isinstance(self.bias_correction, bool):
            p.append(f"bias correction must be true or false, got {self.bias_correction!r}")
        if self.adaln not in ADALN_MODES:
            p.append(f"adaLN storage must be one of {ADALN_MODES}, got {self.adaln!r}")
        if is_int(self.calib_labels):
            if self.calib_labels < 1:
                p.append(f"the number of calibration labels must be at least 1, got {self.calib_labels}")
        elif not (isinstance(self.calib_labels, tuple) and self.calib_labels
                  and all(is_int(v) and v >= 0 for v in self.calib_labels)):
            p.append(f"calibration labels must be a count or a list of non-negative labels, got {self.calib_labels!r}")
        if not is_int(self.seed):
            p.append(f"seed must be an integer, got {self.seed!r}")
        if not (is_int(self.steps) and self.steps >= 2):
            p.append(f"calibration steps must be an integer of at least 2, got {self.steps!r}")
        if not isinstance(self.cfg_scale, (int, float)) or isinstance(self.cfg_scale, bool) or self.cfg_scale < 0:
            p.append(f"calibration cfg scale must be a non-negative number, got {self.cfg_scale!r}")
        if self.sampler not in SAMPLERS:
            p.append(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if p:
            raise ConfigError("invalid quantization config: " + "; ".join(p))

    # -- derived ----------------------------------------------------------------------------------
    def smooths(self, role: str) -> bool:
        return self.smoothing != "none" and role in self.smooth_roles

    def labels_for(self, num_classes: int) -> list[int]:
        """Calibration labels for a model with ``num_classes`` classes.

        A count N gives the reference's 16 ImageNet labels (first N) for 1000-class models, and N
        labels spread evenly over the classes otherwise.
        """
        if isinstance(self.calib_labels, tuple):
            bad = [v for v in self.calib_labels if v >= num_classes]
            if bad:
                raise ConfigError(f"calibration label {bad[0]} is out of range: the model has classes "
                                  f"0..{num_classes - 1}")
            return list(self.calib_labels)
        n = self.calib_labels
        if num_classes == 1000 and n <= len(REFERENCE_LABELS):
            return list(REFERENCE_LABELS[:n])
        if n <= num_classes:
            return [(i * num_classes) // n for i in range(n)]
        return [i % num_classes for i in range(n)]

    def calibration_key(self) -> tuple:
        """Settings that determine the FP calibration trajectory (shared between recipes)."""
        return (self.calib_labels, self.seed, self.steps, float(self.cfg_scale), self.sampler)

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown quantization config keys: {unknown}")
        return cls(**data)
