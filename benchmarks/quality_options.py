"""Quality cost of speed options on the default model: FP, ``ditas`` default, ``ditas`` with each option.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality_options.py --num 500 --cfg 1.5 \
        --json docs/quality_options.json

One process, the same labels (i % 10) and the same noise (sample i's noise from (seed, i), as every
ditas sampling run) for every row:

1. ``fp``: the embedded default digit model in fp32;
2. the model quantized ONCE with the ``ditas`` recipe (W4A8; the recipe's calibration settings, or
   the lighter ones given on the command line; LoRA factors kept in fp32 as fitted), then for every
   option a fresh copy of it, the option applied (``ditas``: the default, factors held in bf16 as the
   recipe stores them; ``lora_factors_fp32``: as fitted; every other option on top of the default), its kernels chosen (``--kernel``, default ``auto``: what a loaded model runs),
   and the same sampling run.

Per row: PSNR of the uint8 samples against FP, and the digit-domain metrics of
``evaluation.digits.evaluate_digit_samples`` (class accuracy, domain FID against real digits, FID
against the FP samples, precision, recall), plus the eps-prediction MSE along the FP model's own
trajectory (``--eps-samples``, the metric of ``ditas compare``). Sampling goes through
``diffusion.images.generate`` (= ``diffusion.run``), so every row sees exactly the noise a user's
run would.

Adding an option: put ``name: function`` in :data:`OPTIONS`; the function gets a copy of the
quantized model (kernels not chosen yet: every ``QuantLinear`` on the ``simulated`` kernel) and
changes it in place (module attributes, factors, submodules). The ``ditas`` row is the default
model and the yardstick: an option that is to become a default must stay within 0.3 dB PSNR and 1.0
domain FID of it (measured in the same run, same seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

import ditas
from ditas.diffusion.batches import generate
from ditas.diffusion.images import decode_to_uint8
from ditas.diffusion.run import SamplingSettings, eps_mse, eps_trajectory
from ditas.evaluation.digits import evaluate_digit_samples, load_classifier
from ditas.evaluation.metrics import psnr
from ditas.fileio import atomic_file, json_text
from ditas.quantization.apply import quantize
from ditas.quantization.kernels import use_kernels
from ditas.quantization.linear import QuantLinear
from ditas.quantization.recipes import recipe_config
from machine import cpu_name

Option = Callable[[nn.Module], None]


def _default(model: nn.Module) -> None:
    """The default: the fitted LoRA factors held (and saved) in bf16, as the ``ditas`` recipe stores them."""
    for m in _quant_layers(model):
        m.set_lora_dtype(torch.bfloat16)


def lora_factors_fp32(model: nn.Module) -> None:
    """The LoRA factors as fitted, in fp32 (the method's numerics; ``--lora-dtype float32``)."""
    for m in _quant_layers(model):
        m.set_lora_dtype(torch.float32)  # a no-op on factors fitted in fp32


def _attention(mode: str) -> Option:
    """The attention core of every block (``ditas.quantization.attention.use_attention``)."""
    from ditas.quantization.attention import use_attention

    def apply(model: nn.Module) -> None:
        _default(model)
        use_attention(model, mode)

    apply.__doc__ = f"attention in {mode} (use_attention(model, {mode!r}))"
    return apply


def _quant_layers(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def lora_down_int8(model: nn.Module) -> None:
    """The LoRA down rows in the integer product as ONE int8 limb per row (default: three, which
    match the factors exactly): plain per-row int8 LoRA down-projection."""
    _default(model)
    for m in _quant_layers(model):
        m.lora_limbs = 1


# name -> function applied in place to a copy of the quantized model before its kernels are chosen
OPTIONS: dict[str, Option] = {
    "ditas": _default,
    "attn_bf16": _attention("bf16"),
    "attn_int8": _attention("int8"),
    "lora_factors_fp32": lora_factors_fp32,
    "lora_down_int8": lora_down_int8,
}


def sample_images(model: nn.Module, labels: np.ndarray, settings: SamplingSettings, batch_size: int) -> np.ndarray:
    x = generate(model, labels, steps=settings.steps, cfg_scale=settings.cfg_scale, sampler=settings.sampler,
                 seed=settings.seed, batch_size=batch_size, guide_channels=settings.guide_channels, progress=False)
    return decode_to_uint8(model, x)


def evaluate_options(names: list[str], *, num: int = 500, steps: int = 50, cfg_scale: float = 1.5, seed: int = 0,
                     batch_size: int = 250, eps_samples: int = 32, kernel: str = "auto",
                     quant_overrides: dict | None = None, on_row: Callable[[str, dict], None] | None = None
                     ) -> dict[str, dict]:
    """Rows of metrics: ``fp``, then every named option (``ditas`` = the default) on the same samples."""
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; choose among {', '.join(OPTIONS)}")
    settings = SamplingSettings(steps=steps, cfg_scale=cfg_scale, seed=seed)
    fp = ditas.load_dit()
    labels = np.arange(num) % fp.num_classes
    eps_labels = labels[:min(eps_samples, num)].tolist()
    classifier = load_classifier()
    rows: dict[str, dict] = {}

    def finish(name: str, row: dict, images: np.ndarray, fp_images: np.ndarray | None) -> None:
        d = evaluate_digit_samples(images, labels, classifier=classifier, other=fp_images)
        row.update(class_accuracy=d["class_accuracy"], fid=d["fid"], precision=d["precision"], recall=d["recall"],
                   fid_vs_fp=d.get("fid_vs_other", 0.0))
        rows[name] = row
        if on_row is not None:
            on_row(name, row)

    t0 = time.perf_counter()
    fp_images = sample_images(fp, labels, settings, batch_size)
    fp_row = {"psnr_db": None, "eps_mse": 0.0, "sample_time_s": round(time.perf_counter() - t0, 1)}
    traj = eps_trajectory(fp, eps_labels, settings) if eps_labels else None
    finish("fp", fp_row, fp_images, None)

    # fitted once with fp32 factors; the default row holds them in bf16, as the recipe stores them
    # (the recipe rounds the factors it fitted: the same values)
    cfg = recipe_config("ditas", **{"lora_dtype": "float32", **(quant_overrides or {})})
    t0 = time.perf_counter()
    base, _ = quantize(fp, cfg, progress=False, kernel="simulated")
    quantize_s = round(time.perf_counter() - t0, 1)
    for name in names:
        model = copy.deepcopy(base)
        OPTIONS[name](model)
        use_kernels(model, kernel)
        t0 = time.perf_counter()
        images = sample_images(model, labels, settings, batch_size)
        row = {"sample_time_s": round(time.perf_counter() - t0, 1), "quantize_time_s": quantize_s}
        p = float(psnr(images, fp_images))
        row["psnr_db"] = p if np.isfinite(p) else None
        row["eps_mse"] = eps_mse(model, eps_labels, settings, traj) if traj is not None else None
        finish(name, row, images, fp_images)
        del model
    return rows


def markdown(rows: dict[str, dict]) -> str:
    base = rows.get("ditas")
    lines = ["| row | PSNR vs FP (dB) | vs ditas (dB) | domain FID | vs ditas | FID vs FP samples | class acc. | "
             "eps MSE | sample time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    for name, r in rows.items():
        dp = None if base is None or r["psnr_db"] is None or base["psnr_db"] is None else r["psnr_db"] - base["psnr_db"]
        df = None if base is None or name == "fp" else r["fid"] - base["fid"]
        eps = "-" if r.get("eps_mse") is None else f"{r['eps_mse']:.3g}"
        lines.append(f"| {name} | {f(r['psnr_db'])} | {f(dp)} | {f(r['fid'])} | {f(df)} | {f(r['fid_vs_fp'])} | "
                     f"{r['class_accuracy']:.3f} | {eps} | {r['sample_time_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--options", default="all", help=f"comma-separated, or 'all' ({', '.join(OPTIONS)})")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--eps-samples", type=int, default=32, help="FP-trajectory samples for the eps MSE (0: skip)")
    p.add_argument("--kernel", default="auto", help="kernel of the quantized rows (default auto)")
    p.add_argument("--calib-labels", type=int, default=None, help="lighter calibration (default: the recipe's)")
    p.add_argument("--calib-steps", type=int, default=None)
    p.add_argument("--lora-rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", help="also write the rows here (atomically)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(OPTIONS) if args.options == "all" else [n.strip() for n in args.options.split(",") if n.strip()]
    overrides = {k: v for k, v in (("calib_labels", args.calib_labels), ("steps", args.calib_steps),
                                   ("lora_rounds", args.lora_rounds)) if v is not None}
    cpu = cpu_name()
    print(f"CPU {cpu}; torch {torch.__version__}, threads {torch.get_num_threads()}; {args.num} samples, "
          f"{args.steps} steps, cfg {args.cfg}, seed {args.seed}, kernel {args.kernel}", flush=True)
    t0 = time.perf_counter()
    rows = evaluate_options(names, num=args.num, steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                            batch_size=args.batch_size, eps_samples=args.eps_samples, kernel=args.kernel,
                            quant_overrides=overrides,
                            on_row=lambda n, r: print(f"{n}: " + json.dumps(r), flush=True))
    print(markdown(rows))
    if args.json:
        result = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "num": args.num,
                  "steps": args.steps, "cfg_scale": args.cfg, "seed": args.seed, "kernel": args.kernel,
                  "quant_overrides": overrides, "wall_time_s": round(time.perf_counter() - t0, 1), "rows": rows}
        with atomic_file(args.json) as tmp:
            tmp.write_text(json_text(result, "quality options"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
