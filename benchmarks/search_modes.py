"""The alpha-search modes compared on one recorded calibration trajectory (a measurement script).

``compare_search_modes`` runs the block-wise calibration once per ``search_weight`` mode on the
same recorded trajectory and compares, layer by layer, the chosen alpha and the final loss
``L(alpha)`` of the finished layer (with its full LoRA) against the exact search. It produces the
table in docs/quantization.md:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_modes.py [--model PATH] [--steps 50] [--labels 16]
"""

from __future__ import annotations

import argparse
import json
import time

from torch import nn

from ditas.quantization.apply import calibrate, record
from ditas.quantization.config import QuantConfig


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
        cfg = base.with_flat(overrides)
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
    from ditas.loaders import load_dit
    from ditas.quantization.recipes import recipe_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="DiT checkpoint or folder (default: the embedded default model)")
    p.add_argument("--steps", type=int, default=50, help="calibration steps (default 50)")
    p.add_argument("--labels", type=int, default=16, help="calibration labels (default 16)")
    args = p.parse_args(argv)
    model = load_dit(args.model)
    out = compare_search_modes(model, recipe_config("ditas", steps=args.steps, calib_labels=args.labels))
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
