"""torch.compile of the W4A8 model against torch.compile of the bf16 model, DiT-XL/2 widths.

One process, side by side (``bench_int_backend.run_interleaved``: every round calls every variant
once, ratios are medians of per-round ratios, so slow phases of a shared machine cancel out):

- ``fp32``, ``bf16``: the float model (bf16 input pre-cast), eager and ``torch.compile``d;
- ``W4A8 +lora32``: ``bench_int_backend.quantize_dit`` (4-bit per-channel weights, per-tensor
  dynamic 8-bit activations, random rank-32 LoRA in bf16 factors, default LoRA route, the fastest
  integer kernel of this CPU; adaLN weight-only int8), eager and compiled.

Compilation is ``torch.compile(model, fullgraph=True)`` (inductor; the integer products are the
custom ops of ``ditas.quantization.kernels.ops``), done before timing; its wall time is printed.
The relative error of each compiled variant is against its own eager output.

Usage: ``python benchmarks/bench_compile.py [--depth 2] [--threads 1] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn as nn

from bench_int_backend import Variant, _rel, available_kernels, quantize_dit, run_interleaved, xl_width_dit
from machine import cpu_name


def _compiled(model: nn.Module, call, dtype: torch.dtype) -> tuple[nn.Module, float]:
    """``torch.compile(model, fullgraph=True)``, compiled now (one call); returns it and the seconds taken."""
    compiled = torch.compile(model, fullgraph=True)
    t0 = time.perf_counter()
    call(compiled, dtype)
    return compiled, time.perf_counter() - t0


def variants(depth: int) -> tuple[list[Variant], dict[str, float]]:
    """The six variants (eager and compiled fp32, bf16, W4A8) of one random DiT-XL/2-width model,
    each with its error against its eager twin; and the compile seconds of each compiled one."""
    model, x, t, y = xl_width_dit(depth)

    def call(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return m(x.to(dtype), t, y)

    models = {"fp32": (model, torch.float32), "bf16": (copy.deepcopy(model).bfloat16(), torch.bfloat16),
              "W4A8 +lora32": (quantize_dit(copy.deepcopy(model), 4, lora=True, seed=1), torch.float32)}
    vs, seconds = [], {}
    for name, (m, dtype) in models.items():
        eager = Variant(name, partial(call, m, dtype))  # no module: bytes are not this table's subject
        compiled, seconds[name] = _compiled(m, call, dtype)
        comp = Variant(f"{name} compiled", partial(call, compiled, dtype))
        comp.rel_err = _rel(comp.fn().float(), eager.fn().float())
        vs += [eager, comp]
    return vs, seconds


def table(vs: list[Variant], seconds: dict[str, float]) -> str:
    """Median ms and paired ratios against bf16 eager and bf16 compiled."""
    by = {v.name: v for v in vs}

    def ratio(ref: Variant, v: Variant) -> str:
        return f"{statistics.median(r / t for r, t in zip(ref.times, v.times)):.2f}"

    lines = ["| variant | median ms | vs bf16 eager (x faster) | vs bf16 compiled (x faster) | "
             "compiled vs own eager (x faster) | compile s | rel. err vs own eager |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v in vs:
        base = v.name.removesuffix(" compiled")
        own = (ratio(by[base], v), f"{seconds[base]:.0f}", f"{v.rel_err:.1e}") if v.name != base else ("-",) * 3
        lines.append(f"| {v.name} | {statistics.median(v.times) * 1e3:.1f} | {ratio(by['bf16'], v)} | "
                     f"{ratio(by['bf16 compiled'], v)} | " + " | ".join(own) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=2, help="DiT blocks at XL widths (default 2: a shared machine)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU {cpu_name()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"kernels {available_kernels()}", flush=True)
    with torch.inference_mode():
        vs, seconds = variants(args.depth)
        run_interleaved(vs, args.repeats, min_sample_s=0.0)
    print(f"**DiT-XL/2 widths, depth {args.depth}, batch 2, 32x32x4 latent (256 tokens)**\n")
    print(table(vs, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
