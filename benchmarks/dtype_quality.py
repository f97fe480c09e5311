"""W4A8 quality in bf16 vs fp32 compute, against the FP fp32 model (PSNR / relative error).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dtype_quality.py --num 32 --steps 20 --calib-steps 20

Default model (digits DiT): samples of the same noise and labels (DDPM, cfg 4.0) from
- FP in fp32 (the reference) and FP in bf16 (what bf16 alone costs);
- W4A8 ``ditas`` quantized in fp32 and run in fp32;
- the same quantized model cast with ``.to(torch.bfloat16)`` (same codes, bf16 compute);
- W4A8 quantized from the bf16 model (calibration run in bf16) and run in bf16.
Tiny random PixArt transformer (``tests/family_models.py``, 2 blocks, width 16): the relative error
of one transformer output for the same variants. Prints one table (``--json`` also writes it).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

import ditas
from ditas.diffusion.batches import generate
from ditas.diffusion.images import decode_to_uint8, start_noise
from ditas.evaluation.metrics import psnr


def _dit_rows(args) -> list[tuple[str, str, float]]:
    """(model, variant, PSNR dB vs FP fp32) for the default DiT."""
    cfg = ditas.recipe_config("ditas", steps=args.calib_steps)
    labels = np.arange(args.num) % 10
    fp32 = ditas.load_dit()
    z = start_noise(fp32, args.num, args.seed)

    def images(model):
        x = generate(model, labels, steps=args.steps, cfg_scale=4.0, seed=args.seed, batch_size=args.num,
                     progress=False, z=z)
        return decode_to_uint8(model, x.float())

    ref = images(fp32)
    q32 = copy.deepcopy(fp32)
    ditas.quantize_(q32, cfg)
    qb16 = ditas.load_dit(dtype="bfloat16")
    ditas.quantize_(qb16, cfg)
    variants = {"FP, bf16 compute": ditas.load_dit(dtype="bfloat16"), "W4A8, fp32 compute": q32,
                "W4A8 (fp32-calibrated), .to(bf16)": copy.deepcopy(q32).to(torch.bfloat16),
                "W4A8, calibrated and run in bf16": qb16}
    return [("default DiT", name, psnr(images(m), ref)) for name, m in variants.items()]


def _pixart_rows() -> list[tuple[str, str, float]]:
    """(model, variant, relative error vs FP fp32) of one tiny PixArt transformer output."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import family_models as fm

    def call(model, dtype, seed=7, step=0):
        kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in fm.call_kwargs(model, seed=seed, step=step).items()}
        with torch.no_grad():
            return model(**kw)[0].double()

    def quantized(dtype):
        m = fm.tiny_pixart().to(dtype)
        with torch.no_grad(), ditas.record_calibration(m) as calib:
            for step in range(3):
                call(m, dtype, seed=1, step=step)
        ditas.quantize_(m, ditas.recipe_config("ditas", lora_rank=4, lora_rounds=2), calib)
        return m

    fp32 = fm.tiny_pixart()
    ref = call(fp32, torch.float32)
    q32 = quantized(torch.float32)
    variants = {"FP, bf16 compute": (copy.deepcopy(fp32).to(torch.bfloat16), torch.bfloat16),
                "W4A8, fp32 compute": (q32, torch.float32),
                "W4A8 (fp32-calibrated), .to(bf16)": (copy.deepcopy(q32).to(torch.bfloat16), torch.bfloat16),
                "W4A8, calibrated and run in bf16": (quantized(torch.bfloat16), torch.bfloat16)}
    return [("tiny PixArt", name, float((call(m, d) - ref).norm() / ref.norm())) for name, (m, d) in variants.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=32, help="DiT samples")
    p.add_argument("--steps", type=int, default=20, help="DiT sampling steps")
    p.add_argument("--calib-steps", type=int, default=20, help="DiT calibration steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    rows = _dit_rows(args) + _pixart_rows()
    print("| model | variant | vs FP fp32 |\n|---|---|---|")
    for model, name, value in rows:
        metric = f"{value:.2f} dB PSNR" if model == "default DiT" else f"{value:.4f} rel. error"
        print(f"| {model} | {name} | {metric} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{"model": m, "variant": n, "value": v} for m, n, v in rows], indent=2))


if __name__ == "__main__":
    main()
