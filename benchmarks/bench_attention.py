"""Speed of the attention cores of ``ditas.quantization.attention`` at DiT-XL/2 shapes.

    .venv/bin/python benchmarks/bench_attention.py            # batch 2 and 4, 1 and 2 threads (~1 min)
    .venv/bin/python benchmarks/bench_attention.py --quick    # 3 rounds

One process, side by side: for every (threads, batch) every round calls every variant once, in the
same order; the table gives the median wall and process-CPU time per call and the median over
rounds of the per-round ratios to fp32 SDPA and to bf16 SDPA (paired, so slow phases of a shared
machine cancel out). With one thread the ratios are of CPU times (the work itself: on a machine
shared with other jobs, wall time also counts the waits for a core); with two, of wall times
(the CPU time of two OpenMP threads counts their spinning).

Shapes: 16 heads x 72 dims, 256 tokens (DiT-XL/2 at 256x256: a 32x32x4 latent, patch 2); Q, K, V
are the (B, 16, 256, 72) strided views a DiT block hands its attention core (a permuted ``qkv``
output), filled with N(0, 1). ``rel. err`` is the L2 error against fp32 SDPA on these random
inputs: it shows the precision of each core, not the quality of a model (that is
``benchmarks/quality_options.py``).

Variants: ``fp32`` = ``F.scaled_dot_product_attention`` (the default core); ``bf16`` = the same on
bf16 copies (``use_attention(model, "bf16")``); ``int8`` = the SageAttention-style core
(``use_attention(model, "int8")``); ``int8 (c=N)`` = the same with N heads per chunk instead of 4.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ditas.quantization.attention import bf16_attention, int8_attention
from machine import cpu_name

HEADS, HEAD_DIM, TOKENS = 16, 72, 256


def qkv(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V as a DiT block makes them: views into one permuted (3, B, H, N, D) tensor."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, TOKENS, 3 * HEADS * HEAD_DIM, generator=g)
    q, k, v = fused.reshape(batch, TOKENS, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def measure(fns: dict, rounds: int, min_sample_s: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-call wall and process CPU times of every function, ``rounds`` interleaved rounds."""
    inner, wall, cpu = {}, {n: [] for n in fns}, {n: [] for n in fns}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-6)))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner[name]):
                fn()
            wall[name].append((time.perf_counter() - t0) / inner[name])
            cpu[name].append((time.process_time() - c0) / inner[name])
    return wall, cpu


def bench(batch: int, threads: int, rounds: int, min_sample_s: float, chunks: list[int]) -> str:
    torch.set_num_threads(threads)
    q, k, v = qkv(batch)
    fns = {"fp32": lambda: F.scaled_dot_product_attention(q, k, v), "bf16": lambda: bf16_attention(q, k, v),
           "int8": lambda: int8_attention(q, k, v)}
    for c in chunks:
        fns[f"int8 (c={c})"] = (lambda c: lambda: int8_attention(q, k, v, heads_per_chunk=c))(c)
    ref = fns["fp32"]()
    errs = {n: float((f().float() - ref).norm() / ref.norm()) for n, f in fns.items()}
    wall, cpu = measure(fns, rounds, min_sample_s)
    basis = cpu if threads == 1 else wall  # one thread: CPU time is the work, whatever else runs
    lines = [f"**batch {batch}, {threads} thread{'s' if threads > 1 else ''}** (one attention call: "
             f"{batch} x {HEADS} heads x {TOKENS} tokens x {HEAD_DIM} dims; ratios of "
             f"{'CPU' if threads == 1 else 'wall'} times)", "",
             "| core | median wall ms | median CPU ms | vs fp32 (x faster) | vs bf16 (x faster) | rel. err vs fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in fns:
        r32 = statistics.median(a / b for a, b in zip(basis["fp32"], basis[n]))
        r16 = statistics.median(a / b for a, b in zip(basis["bf16"], basis[n]))
        lines.append(f"| {n} | {statistics.median(wall[n]) * 1e3:.2f} | {statistics.median(cpu[n]) * 1e3:.2f} | "
                     f"{r32:.2f} | {r16:.2f} | {errs[n]:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--chunks", type=int, nargs="*", default=[1, 16], help="other heads-per-chunk to compare")
    ap.add_argument("--quick", action="store_true", help="3 rounds, short samples")
    args = ap.parse_args(argv)
    rounds, min_s = (3, 0.02) if args.quick else (args.rounds, 0.2)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {rounds} rounds")
    for threads in args.threads:
        for batch in args.batch:
            print()
            print(bench(batch, threads, rounds, min_s, args.chunks), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
