"""Whole sampling runs, end to end: what the transformer's speed-up buys a user.

    .venv/bin/python benchmarks/e2e_sampling.py --threads 1           # ~8-10 min on 2 shared cores
    .venv/bin/python benchmarks/e2e_sampling.py --quick               # ~1 min smoke run

Two parts, each ONE process with every variant side by side:

1. **DiT-XL/2 shapes, random weights** (depth 28, hidden 1152, 16 heads, 32x32x4 latent, patch 2,
   1000 classes): ``--images`` class-conditional images with classifier-free guidance (the
   transformer batch is twice that: [cond; uncond]), ``--steps`` DDPM steps (respaced from 1000,
   ``diffusion.run.sampling_run``: the sampler math of ``ditas sample``), then the VAE decode of
   the images by a real-shaped diffusers ``AutoencoderKL`` built offline from the
   sd-vae-ft-ema config (random weights, fp32 for every variant; 4x32x32 latents -> 256x256 RGB).
2. **The embedded default digit model** (pixel space, no VAE), ``--default-images`` images, 50
   guided steps, its real ``ditas`` quantization (light calibration: the speed does not depend
   on it).

Variants: ``fp32``; ``bf16`` (the whole transformer in bf16, input cast to bf16, output back to
fp32); ``W8A8`` (8-bit weights, no LoRA, integer kernels); ``W4A8`` (the default numerics: 4-bit
weights, rank-32 LoRA, fc2's on-the-fly smoothing, integer kernels, adaLN weight-only int8, what
``ditas sample`` runs on a quantized folder); ``W4A8 +NAME`` for every option of
``benchmarks/quality_options.py`` (``attn_bf16``/``attn_int8``: ``use_attention``; other names:
the options listed there). On DiT-XL/2 the quantized layers are ``QuantLinear.from_linear`` (RTN
weights, random LoRA factors and smoothing), which run exactly the kernels of a real model.

Same noise: every variant samples the same labels with the same per-sample noise (seed, index).
Timing is interleaved per step: step i of every variant, then step i + 1, so a slow phase of the
shared machine hits every variant alike. Per variant: the transformer's time (the model calls),
the sampler's time (the rest of each step: guidance arithmetic, posterior mean and variance,
noise), the decode time, and their total; ratios are of totals. With ``--threads 1`` (the
default) these are process CPU times (``time.process_time``): the work itself, which a machine
shared with other jobs does not inflate the way it inflates wall time (given too, ``total wall
s``); with more threads they are wall times.

Memory, per variant: ``model MiB`` = rise of the resident set while the variant's model was built
(after the previous one was built, malloc_trim'd); ``peak+ MiB`` = the largest rise of the peak
resident set above the resident set before one of its steps (``/proc/self/clear_refs`` resets the
peak before every step; decode included); ``peak RSS alone`` = the process's resident set before
any model was built (torch, ditas, the VAE) + model + peak+: the peak a process sampling only
this variant would reach. Since all models live in one process, this estimate is the honest
per-variant figure; the process's own peak is printed too. Options that only set the attention
core share the W4A8 model (their ``model MiB`` is that model's).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ditas  # noqa: E402
from ditas.diffusion.images import VAE_SCALE  # noqa: E402
from ditas.diffusion.run import SamplingSettings, sampling_run  # noqa: E402
from ditas.model.dit import DiT, DiTConfig  # noqa: E402
from ditas.quantization.attention import use_attention  # noqa: E402
from ditas.quantization.kernels import use_kernels  # noqa: E402
from ditas.quantization.config import ActivationFormat, WeightFormat  # noqa: E402
from ditas.quantization.linear import LORA_DTYPES, QuantLinear  # noqa: E402
from ditas.quantization.recipes import recipe_config  # noqa: E402
from ditas.quantization.weight_only import quantize_adaln_weight_only  # noqa: E402
from machine import cpu_name  # noqa: E402

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LORA_RANK = 32
LORA_DTYPE = LORA_DTYPES[recipe_config("ditas").lora.dtype]  # the factors as the ditas recipe stores them
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=VAE_SCALE)


# ----------------------------------------------------------------------------------------------
#                                         Memory
# ----------------------------------------------------------------------------------------------


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    _note_peak()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    return _status_mb("VmRSS")


_PROCESS_PEAK = [0.0]  # the largest VmHWM seen (clear_refs resets the kernel's own figure)


def _note_peak() -> float:
    peak = _status_mb("VmHWM")
    _PROCESS_PEAK[0] = max(_PROCESS_PEAK[0], peak)
    return peak


# ----------------------------------------------------------------------------------------------
#                                        Variants
# ----------------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    model: nn.Module
    setup: Callable[[], None] = lambda: None  # called before each of its steps (shared models)
    model_mb: float = 0.0
    peak_plus_mb: float = 0.0
    transformer_s: list[float] = field(default_factory=list)  # wall, per step
    step_s: list[float] = field(default_factory=list)
    decode_s: float = 0.0
    transformer_cpu: list[float] = field(default_factory=list)  # process CPU time, per step
    step_cpu: list[float] = field(default_factory=list)
    decode_cpu: float = 0.0
    images: np.ndarray | None = None


class Timed:
    """Wraps a model function and adds the wall and CPU time of each call to the variant's last step."""

    def __init__(self, fn, variant: "Variant"):
        self.fn, self.v = fn, variant

    def __call__(self, x, t):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.fn(x, t)
        self.v.transformer_s[-1] += time.perf_counter() - t0
        self.v.transformer_cpu[-1] += time.process_time() - c0
        return out


def bf16_model(model: DiT) -> DiT:
    """A bf16 copy whose forward takes and returns fp32 (the sampler stays fp32)."""
    m = copy.deepcopy(model).to(torch.bfloat16)

    def forward(x, t, y):
        return DiT.forward(m, x.to(torch.bfloat16), t, y).float()

    m.forward = forward
    return m


def random_quantized(model: DiT, wbits: int, lora: bool, seed: int = 0) -> DiT:
    """A copy with every block linear a ``QuantLinear`` (RTN weights; with ``lora``: random rank-32
    factors and fc2's on-the-fly smoothing, as the ``ditas`` recipe makes them) and the adaLN
    linears weight-only int8; kernels not chosen yet (simulated)."""
    q = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for block in q.blocks:
        for name in BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, child)
            kw = {}
            if lora:
                kw["lora_down"] = torch.randn(LORA_RANK, lin.in_features, generator=g) * lin.in_features ** -0.5
                kw["lora_up"] = torch.randn(lin.out_features, LORA_RANK, generator=g) * 0.01
                if child == "fc2":
                    kw["smooth"] = torch.rand(lin.in_features, generator=g) + 0.5
            setattr(parent, child, QuantLinear.from_linear(lin, WeightFormat(wbits), ActivationFormat(8), lora_dtype=LORA_DTYPE, **kw))
            del lin
    quantize_adaln_weight_only(q)
    return q


def options() -> dict[str, Callable[[nn.Module], None]]:
    """The named W4A8 options of ``benchmarks/quality_options.py`` (without its default row)."""
    from quality_options import OPTIONS

    return {k: v for k, v in OPTIONS.items() if k != "ditas"}


def attention_mode(option: str) -> str | None:
    """``attn_bf16`` -> ``bf16`` (options that only set the attention core share the W4A8 model)."""
    return option[5:] if option.startswith("attn_") else None


def build_variants(fp: DiT, make_quantized: Callable[[int, bool], nn.Module], names: list[str],
                   option_names: list[str]) -> list[Variant]:
    """fp32, bf16, W8A8, W4A8 and W4A8 +option models, each built once, with its resident size."""
    out: list[Variant] = []
    opts = options()

    def add(name: str, build: Callable[[], nn.Module], setup: Callable[[nn.Module], None] | None = None) -> None:
        _trim()
        before = rss_mb()
        model = build()
        _trim()
        v = Variant(name, model, model_mb=rss_mb() - before)
        if setup is not None:
            v.setup = lambda: setup(model)
        out.append(v)

    if "fp32" in names:
        out.append(Variant("fp32", fp, model_mb=float("nan")))  # built by the caller; measured there
    if "bf16" in names:
        add("bf16", lambda: bf16_model(fp))
    if "W8A8" in names:
        add("W8A8", lambda: _with_kernels(make_quantized(8, False)))
    w4 = None
    if "W4A8" in names or option_names:
        add("W4A8", lambda: _with_kernels(make_quantized(4, True)), lambda m: use_attention(m, "fp32"))
        w4 = out[-1]
    for opt in option_names:
        mode = attention_mode(opt)
        if mode is not None:  # the same model, another attention core for its steps
            out.append(Variant(f"W4A8 +{opt}", w4.model, setup=lambda mode=mode: use_attention(w4.model, mode),
                               model_mb=w4.model_mb))
        else:
            def build(opt=opt):
                m = make_quantized(4, True)
                opts[opt](m)
                return _with_kernels(m)
            add(f"W4A8 +{opt}", build)
    if "W4A8" not in names and w4 is not None:
        w4.name = "W4A8 (default)"
    return out


def _with_kernels(model: nn.Module) -> nn.Module:
    use_kernels(model, "auto")
    return model


# ----------------------------------------------------------------------------------------------
#                                     The interleaved run
# ----------------------------------------------------------------------------------------------


def run_interleaved(variants: list[Variant], labels: torch.Tensor, settings: SamplingSettings,
                    decode: Callable[[torch.Tensor], np.ndarray]) -> None:
    n = labels.numel()
    runs = []
    for v in variants:
        v.setup()
        runs.append(sampling_run(v.model, labels, settings, wrap=lambda fn, v=v: Timed(fn, v)))
    finals: list[torch.Tensor | None] = [None] * len(variants)
    for _ in range(settings.steps):
        for i, (v, run) in enumerate(zip(variants, runs)):
            v.setup()
            v.transformer_s.append(0.0)
            v.transformer_cpu.append(0.0)
            _trim()
            _reset_peak()
            before = rss_mb()
            t0, c0 = time.perf_counter(), time.process_time()
            _, x = next(run)
            v.step_s.append(time.perf_counter() - t0)
            v.step_cpu.append(time.process_time() - c0)
            v.peak_plus_mb = max(v.peak_plus_mb, _note_peak() - before)
            finals[i] = x[:n]
    for v, x in zip(variants, finals):
        _trim()
        _reset_peak()
        before = rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        v.images = decode(x)
        v.decode_s = time.perf_counter() - t0
        v.decode_cpu = time.process_time() - c0
        v.peak_plus_mb = max(v.peak_plus_mb, _note_peak() - before)


def report(title: str, variants: list[Variant], base_mb: float, cpu: bool) -> tuple[str, list[dict]]:
    """The table; ``cpu``: times are process CPU times (one thread: the work, not the waits for a
    core on a shared machine), else wall times."""
    by = {v.name: v for v in variants}

    def parts(v: Variant) -> tuple[float, float, float]:
        steps, tr, dec = (v.step_cpu, v.transformer_cpu, v.decode_cpu) if cpu else (v.step_s, v.transformer_s,
                                                                                      v.decode_s)
        return sum(tr), sum(steps) - sum(tr), dec

    total = {v.name: sum(parts(v)) for v in variants}
    kind = "CPU" if cpu else "wall"
    lines = [f"**{title}**", "",
             f"| variant | total {kind} s | transformer s | sampler s | decode s | outside transformer | "
             "vs fp32 (x faster) | vs bf16 (x faster) | transformer vs bf16 | total wall s | model MiB | peak+ MiB "
             "| peak RSS alone MiB | PSNR vs fp32 (dB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = []
    ref = by.get("fp32")
    for v in variants:
        tr, sampler, dec = parts(v)
        out_share = (sampler + dec) / total[v.name]
        r32 = total["fp32"] / total[v.name] if "fp32" in total else float("nan")
        r16 = total["bf16"] / total[v.name] if "bf16" in total else float("nan")
        t16 = parts(by["bf16"])[0] / tr if "bf16" in by else float("nan")
        wall = sum(v.step_s) + v.decode_s
        alone = base_mb + (v.model_mb if v.model_mb == v.model_mb else 0.0) + v.peak_plus_mb
        p = _psnr(v.images, ref.images) if ref is not None and v is not ref else float("nan")
        lines.append(f"| {v.name} | {total[v.name]:.2f} | {tr:.2f} | {sampler:.2f} | {dec:.2f} | "
                     f"{100 * out_share:.1f} % | {r32:.2f} | {r16:.2f} | {t16:.2f} | {wall:.1f} | {v.model_mb:.0f} | "
                     f"{v.peak_plus_mb:.0f} | {alone:.0f} | {'-' if p != p else f'{p:.2f}'} |")
        rows.append(dict(variant=v.name, time_kind=kind, total_s=total[v.name], transformer_s=tr, sampler_s=sampler,
                         decode_s=dec, outside_share=out_share, vs_fp32=r32, vs_bf16=r16, transformer_vs_bf16=t16,
                         total_wall_s=wall, model_mib=v.model_mb, peak_plus_mib=v.peak_plus_mb,
                         peak_rss_alone_mib=alone, psnr_vs_fp32=None if p != p else p))
    return "\n".join(lines), rows


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------
#                                          Parts
# ----------------------------------------------------------------------------------------------


def part_xl(args, names: list[str], option_names: list[str]) -> tuple[str, list[dict]]:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval()
    vae.encoder = None  # decoding only
    _trim()
    base = rss_mb()
    cfg = DiTConfig(depth=args.depth)  # DiT-XL/2 widths
    fp = DiT(cfg).eval()
    _randomize_zero_inits(fp)
    _trim()
    fp_mb = rss_mb() - base
    variants = build_variants(fp, lambda w, lora: random_quantized(fp, w, lora), names, option_names)
    for v in variants:
        if v.name == "fp32":
            v.model_mb = fp_mb
    labels = torch.arange(args.images) * 7 % cfg.num_classes
    settings = SamplingSettings(steps=args.steps, cfg_scale=4.0, seed=0)

    def decode(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return to_uint8(vae.decode(x.float() / VAE_SCALE).sample)

    run_interleaved(variants, labels, settings, decode)
    title = (f"DiT-XL/2 shapes (depth {args.depth}), random weights: {args.images} images, cfg 4.0 (transformer "
             f"batch {2 * args.images}), {args.steps} DDPM steps, VAE decode (sd-vae-ft-ema shape, fp32)")
    return report(title, variants, base, cpu=args.threads == 1)


def part_default(args, names: list[str], option_names: list[str]) -> tuple[str, list[dict]]:
    from ditas.quantization.apply import quantize

    _trim()
    base = rss_mb()
    fp = ditas.load_dit().eval()
    _trim()
    fp_mb = rss_mb() - base

    def make(wbits: int, lora: bool) -> nn.Module:
        over = dict(steps=args.calib_steps, calib_labels=args.calib_labels)
        cfg = recipe_config("ditas", w_bits=wbits, a_bits=8, **over) if lora else \
            recipe_config("ditas", w_bits=wbits, a_bits=8, lora_rank=0, **over)
        q, _ = quantize(fp, cfg, progress=False, kernel="simulated")
        return q

    variants = build_variants(fp, make, names, option_names)
    for v in variants:
        if v.name == "fp32":
            v.model_mb = fp_mb
    labels = torch.arange(args.default_images) % fp.num_classes
    settings = SamplingSettings(steps=args.default_steps, cfg_scale=4.0, seed=0)
    run_interleaved(variants, labels, settings, to_uint8)
    title = (f"Default digit model (32x32x1, patch 4, hidden 192, depth 6): {args.default_images} images, cfg 4.0, "
             f"{args.default_steps} DDPM steps (pixel space, no decode)")
    return report(title, variants, base, cpu=args.threads == 1)


def _randomize_zero_inits(model: DiT, seed: int = 0) -> None:
    """adaLN-Zero starts the modulation and output layers at zero; give them small random content."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in [b.adaLN_modulation[1] for b in model.blocks] + [model.final_layer.adaLN_modulation[1],
                                                                      model.final_layer.linear]:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--parts", default="xl,default", help="xl, default or both (default)")
    ap.add_argument("--variants", default="fp32,bf16,W8A8,W4A8", help="base variants (default all four)")
    ap.add_argument("--options", default="all",
                    help="W4A8 options of benchmarks/quality_options.py, comma-separated, 'all' or 'none'")
    ap.add_argument("--images", type=int, default=2, help="DiT-XL/2 images (transformer batch: twice; default 2)")
    ap.add_argument("--steps", type=int, default=10, help="DiT-XL/2 sampling steps (default 10)")
    ap.add_argument("--depth", type=int, default=28, help="DiT-XL/2 depth (default 28)")
    ap.add_argument("--default-images", type=int, default=10, help="default-model images (default 10)")
    ap.add_argument("--default-steps", type=int, default=50, help="default-model steps (default 50)")
    ap.add_argument("--calib-steps", type=int, default=10, help="default-model calibration steps (default 10)")
    ap.add_argument("--calib-labels", type=int, default=4, help="default-model calibration labels (default 4)")
    ap.add_argument("--quick", action="store_true", help="depth 4, 3 steps; default model 10 steps")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.steps, args.default_steps, args.calib_steps, args.calib_labels = 4, 3, 10, 4, 2
    torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = options()
    option_names = list(known) if args.options == "all" else [] if args.options == "none" else \
        [o.strip() for o in args.options.split(",") if o.strip()]
    bad = [o for o in option_names if o not in known] + [n for n in names if n not in ("fp32", "bf16", "W8A8", "W4A8")]
    if bad:
        raise SystemExit(f"unknown variant(s)/option(s) {bad}; options: {', '.join(known)}")
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {args.threads} thread(s); options: "
          f"{', '.join(option_names) or 'none'}", flush=True)
    result = {"cpu": cpu_name(), "torch": torch.__version__, "threads": args.threads, "args": vars(args), "parts": {}}
    t0 = time.perf_counter()
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        fn = {"xl": part_xl, "default": part_default}.get(part)
        if fn is None:
            raise SystemExit(f"unknown part {part!r}; choose xl, default")
        table, rows = fn(args, names, option_names)
        print()
        print(table, flush=True)
        result["parts"][part] = rows
        _trim()
    _note_peak()
    print(f"\nprocess peak RSS {_PROCESS_PEAK[0]:.0f} MiB (all variants' models at once), "
          f"wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
