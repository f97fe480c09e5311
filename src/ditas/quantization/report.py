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


def compare_search_modes(model: nn.Module, base: QuantConfig, modes=("plain", "approx", "shortlist", "exact"),
                         progress: bool = False) -> dict:
    traj = record(model, base, progress)
    runs = {}
    for mode in modes:
        cfg = dataclasses.replace(base, search_weight=mode)
        t0 = time.perf_counter()
        cal = calibrate(model, cfg, traj, progress)
        runs[mode] = {"time_s": time.perf_counter() - t0,
                      "alpha": {n: r.alpha for n, r in cal.layers.items()},
                      "loss": {n: r.loss for n, r in cal.layers.items()},
                      "rel_out_err": {n: r.rel_out_err for n, r in cal.layers.items()}}
    ref = runs.get("exact") or runs[modes[-1]]
    summary = {}
    for mode, r in runs.items():
        names = list(r["alpha"])
        same = sum(r["alpha"][n] == ref["alpha"][n] for n in names)
        ratio = [r["loss"][n] / ref["loss"][n] for n in names if ref["loss"][n] > 0]
        no_worse = sum(r["loss"][n] <= ref["loss"][n] * (1 + 1e-6) for n in names)
        summary[mode] = {"search_time_s": round(r["time_s"], 1), "layers": len(names), "same_alpha_as_exact": same,
                         "final_loss_at_most_exact": no_worse,
                         "mean_rel_output_error": sum(r["rel_out_err"].values()) / len(names),
                         "final_loss_ratio_vs_exact_mean": sum(ratio) / len(ratio),
                         "final_loss_ratio_vs_exact_max": max(ratio),
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
