"""Per-layer quantization: TAS factors, the alpha grid search, and the final training-free LoRA.

For one layer with FP inputs ``X_t`` recorded at every calibration step ``t``:

    L(alpha) = sum_t mean( (Q_A(X_t / s) W_eff(alpha)^T + b  -  (X_t W^T + b))^2 )

and the chosen alpha is the first argmin over the grid. Which ``W_eff(alpha)`` the search scores
is ``QuantConfig.smooth.search_weight``:

- ``plain``: ``Q_W(W s)``; the LoRA rounds run once, at the chosen alpha (cheap: no SVD in the
  search, which is then matmul-bound);
- ``approx``: one LoRA round with a randomized rank-r SVD per alpha;
- ``exact``: every LoRA round per alpha (the definition; 21 x rounds rank-r fits per layer),
  the kept alpha's fit reused as the layer's LoRA;
- ``shortlist``: ``approx`` over the grid, then the ``search_shortlist`` best alphas rescored
  with every LoRA round (the definition's loss); the best of those is kept, its fit reused;
- ``auto`` (default): ``exact``.

``exact`` is affordable at DiT-XL/2 size because (1) above 1024 the rank-r fits are a randomized
SVD whose subspace is warm-started from the previous LoRA round (``lora.low_rank``: one power
iteration instead of four, as accurate as LAPACK for these fits), (2) the alphas of one layer are
scored in parallel threads (``search_workers``, default torch's thread count; results do not
depend on it), and (3) the weight quantizer makes few passes over the weight.

Besides alpha, a layer may be built in several *variants* (``Variant``): its input Hadamard-rotated
or not (``smooth.rotation``, ``rotation.py``), the low-rank branch fitted after quantizing or taken
from the weight's SVD first (``lora.order``, ``absorb.py``), weights rounded to nearest or by GPTQ
(``weights.rounding``, ``gptq.py``). Each option set to ``search`` doubles the variants; every
variant runs the whole alpha search above, and the layer keeps the variant whose final loss is
lowest (first of equals, plain ones first); ``report.json`` records the choice per layer.

The search subsamples tokens per step (``LayerInputs.xs``) but takes per-tensor activation ranges
from all tokens (``colmin``/``colmax``): for positive ``s``, ``min_j(colmin_j / s_j)`` is exactly
the minimum of ``X / s``, so the quantizer sees the same scale as at inference on that batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .absorb import fit_branch
from .config import QuantConfig
from .gptq import gptq_quantize, second_moment
from .lora import LoraFit, torch_threads, training_free_lora
from .quantizers import activation_quantizer, qparams_from_range, quantize_activation_with, \
    weight_quantizer as format_quantizer
from .rotation import fwht, hadamard_block, rotate_second_moment, rotate_weight
from .smoothing import tas_factors
from ..calibration.inputs import LayerInputs  # noqa: F401  (re-exported)

@dataclass
class LayerQuant:
    """The outcome for one layer: everything needed to build its ``QuantLinear``."""

    name: str
    role: str
    alpha: float | None
    smooth: torch.Tensor | None           # s (in,), or None without smoothing
    codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    bias: torch.Tensor | None
    lora_up: torch.Tensor | None
    lora_down: torch.Tensor | None
    losses: dict[float, float] = field(default_factory=dict)   # search loss per alpha
    loss: float = float("nan")           # L(alpha) of the final layer (with the final LoRA)
    rel_out_err: float = float("nan")    # loss / sum_t mean(Y_fp^2)
    rel_weight_err: float = float("nan")  # ||W_eff / s - W|| / ||W||
    lora_err_per_round: list[float] = field(default_factory=list)
    lora_kept_round: int = -1
    rotation: int = 0             # Hadamard block of the input rotation (0: none)
    lora_order: str = ""          # quantize_first / svd_first ("" without a branch)
    rounding: str = "nearest"     # nearest / gptq
    variant_losses: dict[str, float] = field(default_factory=dict)  # loss of each variant searched

    def summary(self) -> dict:
        return {"role": self.role, "alpha": self.alpha, "loss": self.loss, "rel_output_error": self.rel_out_err,
                "rel_weight_error": self.rel_weight_err,
                "search_losses": {f"{a:.2f}": v for a, v in self.losses.items()},
                "lora_error_per_round": self.lora_err_per_round, "lora_kept_round": self.lora_kept_round,
                "rotation": self.rotation, "lora_order": self.lora_order, "rounding": self.rounding,
                **({"variant_losses": self.variant_losses} if len(self.variant_losses) > 1 else {})}


@dataclass(frozen=True)
class Variant:
    """One way to build a layer besides alpha: input rotation block (0: none), the low-rank
    branch's order (``absorb.py``) and the weight rounding (``nearest`` or ``gptq``)."""

    rotation: int
    order: str
    rounding: str

    def label(self) -> str:
        return f"rot{self.rotation}/{self.order}/{self.rounding}"


def _roundings(cfg: QuantConfig) -> tuple[str, ...]:
    r = cfg.weights.rounding
    return ("nearest", "gptq") if r == "search" else (r,)


def _variants(cfg: QuantConfig, width: int) -> list[Variant]:
    """The variants the layer's search scores (the config's choices; ``search`` = both options),
    plain ones first so that a tie keeps the simpler layer."""
    rot = {"none": (0,), "hadamard": (hadamard_block(width),), "search": (0, hadamard_block(width))}
    orders = ("quantize_first", "svd_first") if cfg.lora.order == "search" else (cfg.lora.order,)
    if not cfg.lora.rank:
        orders = ("quantize_first",)
    return [Variant(r, o, q) for r in rot[cfg.smooth.rotation] for o in orders for q in _roundings(cfg)]


@dataclass
class _Pick:
    """The best alpha of one variant, its fit and the loss of the layer as it would be built."""

    variant: Variant
    alpha: float | None
    losses: dict
    s: torch.Tensor | None
    fit: LoraFit
    w_eff: torch.Tensor
    loss: float


def _variant_quantizer(cfg: QuantConfig, variant: Variant, hess: torch.Tensor | None, s: torch.Tensor | None):
    """The weight quantizer of a variant at one alpha: round-to-nearest, or GPTQ with the second
    moment of the inputs the quantized weight reads, ``x / s`` (rotated)."""
    if variant.rounding == "nearest":
        return weight_quantizer(cfg)
    assert hess is not None
    h = hess if s is None else hess / (s.double()[:, None] * s.double()[None, :])
    if variant.rotation:
        h = rotate_second_moment(h, variant.rotation)
    f = cfg.weights

    def q(w: torch.Tensor):
        return gptq_quantize(w, h, f.bits, f.layout, f.group_size, f.range_mode, f.gptq_order, f.format)

    return q


def _search_variant(w: torch.Tensor, inputs: LayerInputs, cfg: QuantConfig, loss_fn: "_Loss", alphas: list,
                    variant: Variant, hess: torch.Tensor | None) -> _Pick:
    """The alpha search (``smooth.search_weight``) for one variant."""
    mode = cfg.smooth.search_weight
    if mode == "auto":
        mode = "exact"
    rank, rot = cfg.lora.rank, variant.rotation
    w_max = w.abs().amax(dim=0)

    def smoothed(a):
        s = None if a is None else tas_factors(inputs.absmax, w_max, a)
        ws = w if s is None else w * s[None, :]
        return s, (rotate_weight(ws, rot) if rot else ws)

    def full_fit(a):  # the layer as it will be built at this alpha: all LoRA rounds
        s, ws = smoothed(a)
        f = fit_branch(ws, _variant_quantizer(cfg, variant, hess, s), rank, cfg.lora.rounds, cfg.lora.keep,
                       cfg.lora.svd, variant.order)
        return s, f, (f.dequant if f.up is None else f.dequant + f.up @ f.down)

    def scored_full(a):
        full = full_fit(a)
        return a, loss_fn(full[0], full[2], rot), full

    def scored_screen(a):  # plain / approx / shortlist's first pass
        s, ws = smoothed(a)
        quant = _variant_quantizer(cfg, variant, hess, s)
        if rank and mode in ("approx", "shortlist"):
            f = fit_branch(ws, quant, rank, 1, "last", "randomized", variant.order)
            w_eff = f.dequant + f.up @ f.down
        else:
            w_eff = quant(ws)[1]
        return a, loss_fn(s, w_eff, rot), None

    losses: dict = {}
    kept = None  # (alpha, (s, fit, w_eff)) of the best full fit scored so far: reused at the end

    def collect(results):  # in grid order, so ties keep the first alpha, as a serial loop would
        nonlocal kept
        for a, loss, full in results:
            losses[a] = loss
            if full is not None and (kept is None or loss < losses[kept[0]]):
                kept = (a, full)

    if len(alphas) > 1:
        full_search = bool(rank) and mode == "exact"
        collect(_parallel_map(scored_full if full_search else scored_screen, alphas, cfg.smooth.search_workers))
        candidates = alphas
        if rank and mode == "shortlist":
            # rescore the most promising alphas of the one-round search with every LoRA round
            candidates = sorted(sorted(alphas, key=lambda a: losses[a])[:cfg.smooth.search_shortlist])
            collect(_parallel_map(scored_full, candidates, cfg.smooth.search_workers))
        best = min(candidates, key=lambda a: losses[a])
    else:
        best = alphas[0]
    if kept is not None and kept[0] == best:
        s, fit, w_eff = kept[1]
        loss = losses[best]
    else:
        s, fit, w_eff = full_fit(best)
        loss = loss_fn(s, w_eff, rot)
    return _Pick(variant, best, losses, s, fit, w_eff, loss)


def weight_quantizer(cfg: QuantConfig):
    """The config's weight quantizer: float (out, in) -> ((codes, scale, zero), dequantized)
    (``quantizers.weight_quantizer``: one function per format)."""
    return format_quantizer(cfg.weights)


def _quant_inputs(inputs: LayerInputs, steps: int, s: torch.Tensor | None, cfg: QuantConfig,
                  rot: int = 0) -> torch.Tensor:
    """Q_A(X_t / s) for the first ``steps`` steps, concatenated. Per-tensor ranges (INT per tensor,
    NVFP4's tensor scale) come from all tokens (``colmin``/``colmax``), the rest from each token.
    With a rotation, ``Q_A((X_t / s) H^T)``, whose per-tensor range is taken from the (subsampled)
    rotated tokens themselves: the channel extremes do not survive a rotation."""
    outs = []
    a = cfg.activations
    quant = activation_quantizer(a)
    for t in range(steps):
        x = inputs.xs[t] if s is None else inputs.xs[t] / s
        if rot:
            x = fwht(x, rot)
        if a.bits < 16 and (a.granularity == "tensor" or a.format == "nvfp4") and not rot:
            lo_c, hi_c = (inputs.colmin[t], inputs.colmax[t]) if s is None else \
                (inputs.colmin[t] / s, inputs.colmax[t] / s)
            if a.format == "int":
                scale, zero = qparams_from_range(lo_c.min(), hi_c.max(), a.bits, a.range_mode)
                outs.append(quantize_activation_with(x, a.bits, scale, zero))
            else:  # NVFP4: the tensor scale from the whole batch's amax
                outs.append(quant(x, torch.maximum(lo_c.min().abs(), hi_c.max().abs())))
        else:  # per token or group, or a rotated tensor: ranges from the tokens at hand
            outs.append(quant(x))
    return torch.cat(outs)


class _Loss:
    """L(alpha) for one layer: FP outputs are computed once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inputs: LayerInputs, cfg: QuantConfig,
                 out_scale: torch.Tensor | None):
        self.cfg, self.inputs, self.bias = cfg, inputs, bias
        self.steps = min(len(inputs.xs), cfg.smooth.loss_steps or len(inputs.xs))
        self.sizes = [inputs.xs[t].shape[0] for t in range(self.steps)]
        x = torch.cat(inputs.xs[: self.steps])
        self.y_fp = torch.nn.functional.linear(x, weight, bias)
        self.out_scale = out_scale
        self.fp_energy = self._sum_of_means(self.y_fp)

    def _sum_of_means(self, e: torch.Tensor) -> float:
        """sum over steps of mean(e^2), in the unfolded output space (``out_scale``)."""
        e = e if self.out_scale is None else e * self.out_scale
        return float(sum(chunk.pow(2).mean() for chunk in torch.split(e, self.sizes)))

    def _error(self, s: torch.Tensor | None, w_eff: torch.Tensor, rot: int = 0) -> torch.Tensor:
        xq = _quant_inputs(self.inputs, self.steps, s, self.cfg, rot)
        return torch.nn.functional.linear(xq, w_eff, self.bias) - self.y_fp

    def __call__(self, s: torch.Tensor | None, w_eff: torch.Tensor, rot: int = 0) -> float:
        return self._sum_of_means(self._error(s, w_eff, rot))

    def bias_corrected(self, s: torch.Tensor | None, w_eff: torch.Tensor, rot: int = 0
                       ) -> tuple[torch.Tensor, float]:
        """The bias minus the mean output error per channel (mean over steps of the per-step means:
        the loss's weighting of steps), i.e. the systematic part of the error, which a bias can
        absorb; and the loss with that bias. One evaluation of the quantized layer."""
        assert self.bias is not None, "bias correction needs a layer with a bias"
        err = self._error(s, w_eff, rot)
        mean = torch.stack([chunk.mean(dim=0) for chunk in torch.split(err, self.sizes)]).mean(dim=0)
        return self.bias - mean, self._sum_of_means(err.sub_(mean))


def _check_finite(name: str, what: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        from ..errors import CalibrationError

        raise CalibrationError(f"layer {name}: non-finite {what} (NaN or inf)")


def quantize_layer(name: str, role: str, weight: torch.Tensor, bias: torch.Tensor | None, inputs: LayerInputs,
                   cfg: QuantConfig, out_scale: torch.Tensor | None = None) -> LayerQuant:
    """Chooses alpha (if smoothing), quantizes the layer and fits its LoRA branch.

    ``weight``/``bias`` are the float parameters the layer must reproduce (already carrying any
    fold, e.g. ``qkv`` with ``proj``'s factor in its V rows); ``out_scale`` maps output errors
    back to the unfolded output space for the loss.
    """
    w = weight.detach().float()
    b = None if bias is None else bias.detach().float()
    _check_finite(name, "weight", w)
    loss_fn = _Loss(w, b, inputs, cfg, out_scale)
    quant = weight_quantizer(cfg)
    smooth = cfg.smooths(role)
    alphas: list[float | None]
    if not smooth:
        alphas = [None]
    elif cfg.smooth.search:
        alphas = list(cfg.smooth.alpha_grid)
    else:
        alphas = [cfg.smooth.alpha]
    rank = cfg.lora.rank

    if cfg.smooth.quantize_before_smooth:
        # reference numerics: the weight error does not depend on alpha; w_j from the quantized weight
        fit = training_free_lora(w, quant, rank, cfg.lora.rounds, cfg.lora.keep, cfg.lora.svd)
        lr = fit.up @ fit.down if fit.up is not None else None
        base = fit.dequant if lr is None else fit.dequant + lr
        w_max = (fit.dequant if cfg.smooth.w_max_from_quantized else w).abs().amax(dim=0)

        def candidate(a):
            s = None if a is None else tas_factors(inputs.absmax, w_max, a)
            return s, (base if s is None else base * s[None, :]), fit

        losses = {}
        for a in alphas:
            s, w_eff, _ = candidate(a)
            losses[a] = loss_fn(s, w_eff)
        best = min(alphas, key=lambda a: losses[a])
        s, w_eff, fit = candidate(best)
        q, sc, z = fit.codes
        if s is not None:
            sc = _scale_columns(sc, s, cfg)
        down = None if fit.down is None else fit.down * s[None, :] if s is not None else fit.down
        final_fit = LoraFit((q, sc, z), fit.dequant, fit.up, down, fit.err_per_round, fit.kept_round)
        variant, variant_losses = Variant(0, "quantize_first", "nearest"), {}
    else:
        picks = []
        hess = second_moment(inputs.xs[:loss_fn.steps]) if "gptq" in _roundings(cfg) else None
        for variant in _variants(cfg, w.shape[1]):
            picks.append(_search_variant(w, inputs, cfg, loss_fn, alphas, variant, hess))
        pick = min(picks, key=lambda p: p.loss)  # first of equals: the variants' order prefers plain ones
        best, losses, s, final_fit, w_eff, variant = pick.alpha, pick.losses, pick.s, pick.fit, pick.w_eff, pick.variant
        variant_losses = {p.variant.label(): p.loss for p in picks}

    rot = variant.rotation
    if cfg.smooth.bias_correction and b is not None:
        # a systematic output shift moves every sample the same way; the bias absorbs its mean
        b, final_loss = loss_fn.bias_corrected(s, w_eff, rot)
    else:
        final_loss = loss_fn(s, w_eff, rot)
    if len(alphas) == 1:
        losses[best] = final_loss
    w_orig = fwht(w_eff, rot) if rot else w_eff  # the normalised Hadamard is its own inverse
    w_orig = w_orig if s is None else w_orig / s[None, :]
    rel_w = float(torch.linalg.norm(w_orig - w) / torch.linalg.norm(w).clamp(min=1e-12))
    return LayerQuant(name=name, role=role, alpha=best, smooth=s, codes=final_fit.codes, bias=b,
                      lora_up=final_fit.up, lora_down=final_fit.down,
                      losses={float(a): v for a, v in losses.items() if a is not None},
                      loss=final_loss, rel_out_err=final_loss / max(loss_fn.fp_energy, 1e-30), rel_weight_err=rel_w,
                      lora_err_per_round=final_fit.err_per_round if rank else [],
                      lora_kept_round=final_fit.kept_round if rank else -1, rotation=rot,
                      lora_order=variant.order if rank else "", rounding=variant.rounding,
                      variant_losses=variant_losses)


def _parallel_map(fn, items: list, workers: int | None) -> Iterator:
    """``map(fn, items)`` in order, on ``workers`` threads (None: torch's intra-op thread count).

    Each alpha's fit and loss is independent and seeded by its own round numbers (no global RNG),
    so the results do not depend on the number of workers. With several workers, torch ops run
    single-threaded inside each (one alpha per core beats two cores on one alpha's small
    matmuls, QR and LAPACK calls); the thread count is restored afterwards.
    """
    n = torch.get_num_threads() if workers is None else workers
    n = max(1, min(n, len(items)))
    if n == 1:
        yield from map(fn, items)
        return
    with torch_threads(1), ThreadPoolExecutor(max_workers=n) as pool:
        yield from pool.map(fn, items)  # lazily: finished fits are dropped unless they are the best


def _scale_columns(scale: torch.Tensor, s: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Scales of a layout whose groups lie inside one input column, multiplied by ``s`` per column."""
    if cfg.weights.layout != "reference32":
        raise ValueError("quantize-before-smooth needs a layout whose groups lie in one input column (reference32)")
    return scale * s[None, :]
