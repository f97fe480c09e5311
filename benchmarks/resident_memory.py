"""Resident memory of a DiT-XL/2-shaped model (random weights): fp32 against W4A8 per kernel.

Writes an fp32 folder and its W4A8 form (every block linear ``QuantLinear.from_linear`` with random
rank-32 LoRA factors, ``fc2`` with an on-the-fly smoothing vector, adaLN linears int8 weight-only),
then, each in a fresh process: load the folder and report the resident set (``VmRSS``), run one
forward (batch 2, 256 tokens), return freed heap to the system (``malloc_trim``) and report the
resident set again (what the model holds) and the peak (``VmHWM``), minus ``import torch, ditas``. ``--before SRC`` also measures the same W4A8 folder with another
ditas source tree (e.g. a checkout from before the kernel registry, whose integer layers kept the
unpacked ``qweight`` beside oneDNN's packed copy).

Usage: ``python benchmarks/resident_memory.py --dir /tmp/xl [--model DiT-XL/2] [--before OLD/src]
[--lora-dtypes float32,bfloat16] [--kernels simulated,int_mm,onednn]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

RSS = ("import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0); s = open('/proc/self/status').read(); "
       "print(int(s.split('VmRSS:')[1].split()[0]) / 1024, int(s.split('VmHWM:')[1].split()[0]) / 1024)")
LOADED = "s0 = open('/proc/self/status').read(); print(int(s0.split('VmRSS:')[1].split()[0]) / 1024)"


def write_folders(model_name: str, out: Path, rank: int = 32, lora_dtypes: tuple[str, ...] = ("float32",)) -> None:
    from ditas.model.dit import DiT_models
    from ditas.model.loading import save_dit
    from ditas.quantization.checkpoint import save_quantized
    from ditas.quantization.config import ActivationFormat, WeightFormat
    from ditas.quantization.linear import QuantLinear
    from ditas.quantization.weight_only import quantize_adaln_weight_only

    from ditas.quantization.linear import LORA_DTYPES

    if (out / "fp32" / "config.json").exists() and all((out / w4a8_name(d) / "config.json").exists()
                                                       for d in lora_dtypes):
        return
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    model = DiT_models[model_name]()
    save_dit(model, out / "fp32", overwrite=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                parent, _, child = name.rpartition(".")
                lin = block.get_submodule(name)
                down = torch.randn(rank, lin.in_features, generator=g) * 0.01
                up = torch.randn(lin.out_features, rank, generator=g) * 0.01
                smooth = torch.rand(lin.in_features, generator=g) + 0.5 if name == "mlp.fc2" else None
                q = QuantLinear.from_linear(lin, WeightFormat(4), ActivationFormat(8), lora_down=down, lora_up=up, smooth=smooth)
                setattr(block.get_submodule(parent), child, q)
        quantize_adaln_weight_only(model)
    for dtype in lora_dtypes:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.set_lora_dtype(LORA_DTYPES[dtype])  # the fp32 folder is written first: rounding is one way
        save_quantized(model, out / w4a8_name(dtype), {"recipe": "random-codes"}, overwrite=True)


def w4a8_name(lora_dtype: str) -> str:
    return "w4a8" if lora_dtype == "float32" else f"w4a8-lora-{lora_dtype}"


def measure(snippet: str, src: str | None = None) -> tuple[float, float, float]:
    """(RSS right after the load, RSS after the forward with freed heap returned, peak RSS) in MB."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    done = subprocess.run([sys.executable, "-c", snippet + "; " + RSS], check=True, capture_output=True, text=True,
                          env=env, cwd="/")
    loaded, rss, hwm = done.stdout.split()[-3:]
    return float(loaded), float(rss), float(hwm)


def forward_snippet(folder: Path, load_args: str) -> str:
    return ("import torch, ditas; torch.set_grad_enabled(False); m = ditas.load_dit(%r%s); c = m.config; " + LOADED
            + "; x = torch.randn(2, c.in_channels, c.input_size, c.input_size); "
            "m(x, torch.tensor([1, 500]), torch.tensor([1, 2]))") % (str(folder), load_args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the fp32 and W4A8 folders go (about 3 GB)")
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--before", help="another ditas src tree to measure the W4A8 folder with (backend='int')")
    ap.add_argument("--lora-dtypes", default="float32,bfloat16",
                    help="W4A8 folders to write and measure, by LoRA factor storage (default float32,bfloat16)")
    ap.add_argument("--kernels", default="simulated,int_mm,onednn", help="kernels to measure each W4A8 folder with")
    args = ap.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.lora_dtypes.split(",") if d.strip())
    dtypes = tuple(sorted(dtypes, key=lambda d: d != "float32"))  # fp32 first: bf16 rounds the factors
    write_folders(args.model, args.dir, lora_dtypes=dtypes)
    _, base_rss, _ = measure("import torch, ditas; " + LOADED)
    rows = [("fp32", measure(forward_snippet(args.dir / "fp32", "")))]
    for dtype in dtypes:
        for kernel in [k.strip() for k in args.kernels.split(",") if k.strip()]:
            rows.append((f"W4A8, LoRA {dtype}, kernel {kernel}",
                         measure(forward_snippet(args.dir / w4a8_name(dtype), f", kernel={kernel!r}"))))
    if args.before:
        rows.append(("W4A8, before (backend='int', onednn)",
                     measure(forward_snippet(args.dir / "w4a8", ", backend='int'"), args.before)))
    fp32 = rows[0][1][1] - base_rss
    print(f"{args.model}, random weights; load + one forward (batch 2) in a fresh process; "
          f"`import torch, ditas` alone: {base_rss:.0f} MB resident. 'resident' = RSS after the forward "
          "once freed heap is returned (malloc_trim), minus the import\n")
    print("| model | RSS right after load, MB (minus import) | resident, MB | resident vs fp32 | peak RSS, MB |")
    print("|---|---:|---:|---:|---:|")
    for name, (loaded, rss, hwm) in rows:
        print(f"| {name} | {loaded - base_rss:.0f} | {rss - base_rss:.0f} | {(rss - base_rss) / fp32:.2f} | {hwm:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
