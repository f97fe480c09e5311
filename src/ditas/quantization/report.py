"""Measurements about the quantizer itself (not part of a quantization run).

``compare_search_modes`` runs the block-wise calibration once per ``search_weight`` mode on the
same recorded trajectory and compares, layer by layer, the chosen alpha and the final loss
``L(alpha)`` of the finished layer (with its full LoRA) against the exact search. It produces the
table in docs/quantization.md:

    python -c "from ditas.quantization.report import main; main()" [MODEL] [STEPS] [LABELS]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from torch import nn

from .apply import calibrate, record
from .config import QuantConfig


# search variants compared by ``compare_search_modes``: name -> QuantConfig overrides
SEARCH_VARIANTS: dict[str, dict] = {
    "plain": {"search_weight": "plain"},
    "approx": {"search_weight": "approx"},
    "shortlist": {"search_weight": "shortlist"},
    "exact, randomized SVD": {"search_weight": "exact", "lora_svd": "randomized"},
    "exact": {"search_weight": "exact"},
}


def compare_search_modes(model: nn.Module, base: QuantConfig, variants: dict[str, dict] | None = None,
                         reference: str = "exact", progress: bool = False) -> dict:
    """Calibrates ``model`` once per variant (QuantConfig overrides) on one recorded trajectory and
    compares each variant's alphas and final layer losses with the ``reference`` variant's."""
    variants = SEARCH_VARIANTS if variants is None else variants
    if reference not in variants:
        raise ValueError(f"the reference variant {reference!r} is not among {list(variants)}")
    traj = record(model, base, progress)
    runs = {}
    for name, overrides in variants.items():
        cfg = dataclasses.replace(base, **overrides)
        t0 = time.perf_counter()
        cal = calibrate(model, cfg, traj, progress)
        runs[name] = {"time_s": time.perf_counter() - t0, "overrides": overrides,
                      "alpha": {n: r.alpha for n, r in cal.layers.items()},
                      "loss": {n: r.loss for n, r in cal.layers.items()},
                      "search_losses": {n: r.losses for n, r in cal.layers.items()},
                      "rel_out_err": {n: r.rel_out_err for n, r in cal.layers.items()}}
    ref = runs[reference]
    summary = {}
    for name, r in runs.items():
        names = list(r["alpha"])
        same = sum(r["alpha"][n] == ref["alpha"][n] for n in names)
        ratio = [r["loss"][n] / ref["loss"][n] for n in names if ref["loss"][n] > 0]
        no_worse = sum(r["loss"][n] <= ref["loss"][n] * (1 + 1e-6) for n in names)
        summary[name] = {"search_time_s": round(r["time_s"], 1), "layers": len(names),
                         f"same_alpha_as_{reference}": same, f"final_loss_at_most_{reference}": no_worse,
                         "mean_rel_output_error": sum(r["rel_out_err"].values()) / len(names),
                         f"final_loss_ratio_vs_{reference}_mean": sum(ratio) / len(ratio),
                         f"final_loss_ratio_vs_{reference}_min": min(ratio),
                         f"final_loss_ratio_vs_{reference}_max": max(ratio),
                         "total_loss": sum(r["loss"].values())}
    return {"summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    from ..model.loading import load_dit
    from .recipes import recipe_config

    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv and argv[0] != "default" else None
    steps = int(argv[1]) if len(argv) > 1 else 50
    labels = int(argv[2]) if len(argv) > 2 else 16
    model = load_dit(path)
    out = compare_search_modes(model, recipe_config("ditas", steps=steps, calib_labels=labels))
    print(json.dumps(out["summary"], indent=2))
