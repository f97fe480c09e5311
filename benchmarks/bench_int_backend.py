"""Speed and memory of the integer W4A8 / W8A8 backend against fp32, bf16 and torchao's int8 peer.

Everything is measured in ONE process, side by side: every round calls every variant once (in
the same order), the table reports the median time over rounds and the median over rounds of the
per-round ratios to fp32 and to bf16 (paired, so slow phases of a shared machine cancel out).

Modes
- ``layers``: the four DiT-XL/2 block linears (qkv 1152->3456, proj 1152->1152, fc1 1152->4608,
  fc2 4608->1152) at M = 512 tokens (batch 2 x 256 tokens), random weights;
- ``dit``: a full DiT-XL/2-shaped forward (batch 2, 32x32x4 latent, patch 2: 256 tokens), random
  weights;
- ``adaln``: the adaLN modulation linear (1152 -> 6912) at M = 2 (the conditioning vectors):
  fp32, bf16, ``WeightOnlyInt8Linear`` (bf16 and fp32 compute), torchao ``Int8WeightOnlyConfig``;
- ``digits``: one classifier-free-guided sampling step (``forward_with_cfg``, batch 20) of the small
  default digit model (32x32x1, patch 4, hidden 192, depth 6, 3 heads, 10 classes).

Variants
- ``fp32``, ``bf16``: ``nn.Linear`` / the whole model in that dtype (bf16 input pre-cast);
- ``W4A8 int``: ``QuantLinear.from_linear(..., wbits=4, abits=8, backend="int")``, per-channel weights,
  per-tensor dynamic activations, random rank-32 LoRA factors (``+lora32``) or none, run unfused
  (``quantize_input``, then ``int_linear``, then the LoRA branch from the dequantized input: what
  ``QuantLinear.forward`` did before it called ``int_forward``); in models the adaLN linears are
  ``WeightOnlyInt8Linear``;
- ``... fused``: the same modules run through ``int_kernels.int_forward``, which is what
  ``QuantLinear.forward`` now runs on the integer backend (in-place activation quantization, LoRA
  from the codes, LoRA added in the oneDNN epilogue); ``lora32(bf16)``: with ``lora_bf16=True``
  (the low-rank products in bf16, an approximation of ~1e-4 relative);
- ``... int_mm``: the same with the ``torch._int_mm`` kernel instead of oneDNN;
- ``... bf16 float parts``: the fused W4A8 model with everything that is not quantized
  (embedders, attention, LayerNorm, GELU, residual stream, final linear) in bf16;
- ``W8A8 int``: 8-bit weights, same backend, no LoRA;
- ``torchao int8dyn``: ``torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())``
  on the fp32 model (all ``nn.Linear``; per-token dynamic int8 activations, int8 per-channel weights).

Memory: ``bytes`` = parameters + buffers + derived caches the variant keeps (the prepared int8
weight of the integer backend, torchao's inner tensors); ``peak+`` = rise of the process peak RSS
during one call above the RSS before it (after ``malloc_trim`` and a ``/proc/self/clear_refs``
reset), i.e. the transient memory of a call (activations, workspaces, temporary copies).

Usage: ``python benchmarks/bench_int_backend.py [--mode layers|adaln|dit|digits|all] [--quick] [--repeats N]
[--threads N]``
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from ditas.model.dit import DiT, DiTConfig, DiT_models
from ditas.quantization.int_kernels import available_kernels, int_forward, int_linear, prepare_int_weight
from ditas.quantization.linear import QuantLinear
from ditas.quantization.weight_only import WeightOnlyInt8Linear, quantize_adaln_weight_only

LAYER_SHAPES = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LORA_RANK = 32


# ----------------------------------------------------------------------------------------------
#                                     Measurement helpers
# ----------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _malloc_trim() -> None:
    """Returns freed heap pages to the OS (glibc), so that a call's transient memory shows in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_delta_mb(fn: Callable[[], object]) -> float:
    """Rise of the peak resident set during ``fn()`` above the resident set before it, in MiB."""
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return (peak - before) / 1024


def tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):  # torchao tensor subclasses: count the inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if t.layout == torch._mkldnn:  # opaque oneDNN tensors: numel x element size of the dtype
        return t.numel() * torch.empty(0, dtype=t.dtype).element_size()
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Parameters + buffers + derived caches (int state, dequantized-weight cache, kernel operands)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m._int_state is not None:
                total += m._int_state.nbytes()
            if m._wcache is not None:
                total += tensor_bytes(m._wcache)
        if isinstance(m, WeightOnlyInt8Linear) and m._kernel_args is not None:
            w, ones = m._kernel_args
            total += tensor_bytes(ones) + (0 if w is m.qweight else tensor_bytes(w))
    return total


@dataclass
class Variant:
    name: str
    fn: Callable[[], torch.Tensor]
    module: nn.Module | None = None
    times: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    nbytes: int = 0
    rel_err: float = float("nan")


def run_interleaved(variants: list[Variant], rounds: int, min_sample_s: float) -> None:
    """Warm up, measure peaks, then ``rounds`` interleaved rounds; each sample repeats the call
    enough times to last about ``min_sample_s`` (the scheduler quantum on a shared machine is ms)."""
    inner = {}
    for v in variants:
        v.fn()  # warm-up: prepares caches
        t0 = time.perf_counter()
        v.fn()
        one = time.perf_counter() - t0
        inner[v.name] = max(1, int(min_sample_s / max(one, 1e-6)))
        v.peak_mb = peak_rss_delta_mb(v.fn)
        v.nbytes = model_bytes(v.module) if v.module is not None else 0
    for _ in range(rounds):
        for v in variants:
            n = inner[v.name]
            t0 = time.perf_counter()
            for _ in range(n):
                v.fn()
            v.times.append((time.perf_counter() - t0) / n)


def table(title: str, variants: list[Variant], show_err: bool = True) -> str:
    by = {v.name: v for v in variants}
    fp32, bf16 = by.get("fp32"), by.get("bf16")
    head = "| variant | median ms | vs fp32 (x faster) | vs bf16 (x faster) | bytes (MiB) | peak+ (MiB) |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if show_err:
        head += " rel. err vs fp32 |"
        sep += "---:|"
    lines = [f"**{title}**", "", head, sep]
    for v in variants:
        def ratio(ref: Variant | None) -> str:
            if ref is None:
                return "-"
            return f"{statistics.median(r / t for r, t in zip(ref.times, v.times)):.2f}"
        row = (f"| {v.name} | {statistics.median(v.times) * 1e3:.2f} | {ratio(fp32)} | {ratio(bf16)} | "
               f"{v.nbytes / 2 ** 20:.1f} | {v.peak_mb:.1f} |")
        if show_err:
            row += f" {v.rel_err:.2e} |" if v.rel_err == v.rel_err else " - |"
        lines.append(row)
    return "\n".join(lines)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ----------------------------------------------------------------------------------------------
#                                        Builders
# ----------------------------------------------------------------------------------------------


def _lora(linear: nn.Linear, g: torch.Generator) -> dict[str, torch.Tensor]:
    # small random factors: realistic cost, modest effect on the output
    return dict(lora_down=torch.randn(LORA_RANK, linear.in_features, generator=g) * 0.01,
                lora_up=torch.randn(linear.out_features, LORA_RANK, generator=g) * 0.01)


def quant_linear(linear: nn.Linear, wbits: int, lora: bool, g: torch.Generator, kernel: str | None = None
                 ) -> QuantLinear:
    m = QuantLinear.from_linear(linear, wbits=wbits, abits=8, act_granularity="tensor", backend="int",
                                **(_lora(linear, g) if lora else {}))
    m._int_state = prepare_int_weight(m, kernel)
    return m


def fused(m: QuantLinear, lora_bf16: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    return partial(int_forward, m, lora_bf16=lora_bf16)


def unfused_forward(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The integer layer without fusion: codes, integer product, LoRA from the dequantized input."""
    shape = x.shape
    codes, a_scale, a_zero = m.quantize_input(x.reshape(-1, shape[-1]))
    y = int_linear(m, codes, a_scale, a_zero)
    if m.lora_rank:
        y = y + (((codes - a_zero) * a_scale) @ m.lora_down.t()) @ m.lora_up.t()
    return y.reshape(*shape[:-1], m.out_features)


def torchao_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def quantize_dit(model: DiT, wbits: int, lora: bool, seed: int = 0) -> DiT:
    """Block linears -> integer QuantLinear; adaLN -> weight-only int8 (in place)."""
    g = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        for name in BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, child, quant_linear(getattr(parent, child), wbits, lora, g))
    quantize_adaln_weight_only(model)
    return model


def set_fused(model: nn.Module, on: bool, lora_bf16: bool = False) -> None:
    """Routes every QuantLinear of ``model`` through ``int_forward`` or ``unfused_forward``."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.forward = fused(m, lora_bf16) if on else partial(unfused_forward, m)


def bf16_float_parts(model: DiT) -> DiT:
    """A copy sharing the quantized modules, with every float module/parameter cast to bf16."""
    shared = [m for m in model.modules() if isinstance(m, (QuantLinear, WeightOnlyInt8Linear))]
    memo = {id(m): m for m in shared}
    clone = copy.deepcopy(model, memo)
    for name, module in clone.named_children():
        _cast_float_parts(module)
    clone.pos_embed.data = clone.pos_embed.data.bfloat16()
    return clone


def _cast_float_parts(module: nn.Module) -> None:
    if isinstance(module, (QuantLinear, WeightOnlyInt8Linear)):
        return
    for p in module.parameters(recurse=False):
        p.data = p.data.bfloat16()
    for child in module.children():
        _cast_float_parts(child)


def _randomize_zero_inits(model: DiT, seed: int = 0) -> None:
    """adaLN-Zero starts the modulation and output layers at zero; give them content."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            lin = block.adaLN_modulation[1]
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.02)
        for lin in (model.final_layer.adaLN_modulation[1], model.final_layer.linear):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)


# ----------------------------------------------------------------------------------------------
#                                          Modes
# ----------------------------------------------------------------------------------------------


def bench_layers(rounds: int, min_sample_s: float, tokens: int = 512) -> str:
    out = []
    g = torch.Generator().manual_seed(0)
    kernels = available_kernels()
    for lname, (k, n) in LAYER_SHAPES.items():
        lin = nn.Linear(k, n)
        x = torch.randn(tokens, k, generator=g)
        lin_bf = copy.deepcopy(lin).bfloat16()
        xb = x.bfloat16()
        w4l = quant_linear(lin, 4, True, g)
        w4 = quant_linear(lin, 4, False, g)
        w8 = quant_linear(lin, 8, False, g)
        ao = torchao_int8(nn.Sequential(copy.deepcopy(lin)))
        vs = [Variant("fp32", lambda: lin(x), lin), Variant("bf16", lambda: lin_bf(xb), lin_bf),
              Variant("W4A8 int +lora32", lambda: unfused_forward(w4l, x), w4l),
              Variant("W4A8 int", lambda: unfused_forward(w4, x), w4),
              Variant("W4A8 int +lora32 fused", lambda: int_forward(w4l, x), w4l),
              Variant("W4A8 int +lora32(bf16) fused", lambda: int_forward(w4l, x, lora_bf16=True), w4l),
              Variant("W4A8 int fused", lambda: int_forward(w4, x), w4)]
        if "onednn" in kernels:
            w4mm = quant_linear(lin, 4, False, g, kernel="int_mm")
            vs.append(Variant("W4A8 int (int_mm kernel)", lambda: unfused_forward(w4mm, x), w4mm))
        vs += [Variant("W8A8 int", lambda: unfused_forward(w8, x), w8), Variant("W8A8 int fused", lambda: int_forward(w8, x), w8),
               Variant("torchao int8dyn", lambda: ao(x), ao)]
        with torch.inference_mode():
            ref = lin(x)
            for v in vs:
                v.rel_err = _rel(v.fn(), ref)
            run_interleaved(vs, rounds, min_sample_s)
        out.append(table(f"{lname} {k}->{n}, M={tokens}", vs))
        print(out[-1] + "\n", flush=True)
    return "\n\n".join(out)


def bench_adaln(rounds: int, min_sample_s: float, batch: int = 2) -> str:
    """The adaLN modulation linear (1152 -> 6 x 1152) on the conditioning vectors of a batch."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(1152, 6 * 1152)
    x = torch.randn(batch, 1152, generator=g)
    lin_bf = copy.deepcopy(lin).bfloat16()
    xb = x.bfloat16()
    wo = WeightOnlyInt8Linear.from_linear(lin)
    wo32 = WeightOnlyInt8Linear.from_linear(lin, compute="fp32")
    ao = nn.Sequential(copy.deepcopy(lin))
    quantize_(ao, Int8WeightOnlyConfig())
    vs = [Variant("fp32", lambda: lin(x), lin), Variant("bf16", lambda: lin_bf(xb), lin_bf),
          Variant("WeightOnlyInt8Linear (bf16 compute)", lambda: wo(x), wo),
          Variant("WeightOnlyInt8Linear (fp32 compute)", lambda: wo32(x), wo32),
          Variant("torchao Int8WeightOnlyConfig", lambda: ao(x), ao)]
    with torch.inference_mode():
        ref = lin(x)
        for v in vs:
            v.rel_err = _rel(v.fn(), ref)
        run_interleaved(vs, rounds, min_sample_s)
    return table(f"adaLN modulation linear 1152->6912, M={batch}", vs)


def _model_variants(model: DiT, call: Callable[[nn.Module, torch.dtype], torch.Tensor], with_bf16_parts: bool
                    ) -> list[Variant]:
    """fp32, bf16, W4A8 (+fused, +bf16 float parts), W8A8, torchao: built from one random model."""
    model_bf = copy.deepcopy(model).bfloat16()
    w4 = quantize_dit(copy.deepcopy(model), 4, lora=True, seed=1)
    w8 = quantize_dit(copy.deepcopy(model), 8, lora=False, seed=2)
    ao = torchao_int8(copy.deepcopy(model))
    gc.collect()

    def run(m: nn.Module, dtype: torch.dtype, fuse: bool | None = None, lora_bf16: bool = False) -> torch.Tensor:
        if fuse is not None:
            set_fused(m, fuse, lora_bf16)
        return call(m, dtype)

    vs = [Variant("fp32", partial(run, model, torch.float32), model),
          Variant("bf16", partial(run, model_bf, torch.bfloat16), model_bf),
          Variant("W4A8 int +lora32, adaLN int8", partial(run, w4, torch.float32, False), w4),
          Variant("W4A8 int +lora32 fused, adaLN int8", partial(run, w4, torch.float32, True), w4),
          Variant("W4A8 int +lora32(bf16) fused, adaLN int8", partial(run, w4, torch.float32, True, True), w4)]
    if with_bf16_parts:
        w4b = bf16_float_parts(w4)
        vs.append(Variant("W4A8 int +lora32(bf16) fused, adaLN int8, bf16 float parts",
                          partial(run, w4b, torch.bfloat16, True, True), w4b))
    vs += [Variant("W8A8 int, adaLN int8", partial(run, w8, torch.float32, False), w8),
           Variant("W8A8 int fused, adaLN int8", partial(run, w8, torch.float32, True), w8),
           Variant("torchao int8dyn (all Linear)", partial(run, ao, torch.float32), ao)]
    return vs


def bench_dit(rounds: int, depth: int) -> str:
    torch.manual_seed(0)
    model = DiT_models["DiT-XL/2"]().eval() if depth == 28 else \
        DiT(DiTConfig(depth=depth, hidden_size=1152, num_heads=16, patch_size=2)).eval()
    _randomize_zero_inits(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([500, 20])
    y = torch.tensor([3, 1000])

    def call(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return m(x.to(dtype), t, y)

    with torch.inference_mode():
        vs = _model_variants(model, call, with_bf16_parts=True)
        ref = call(model, torch.float32)
        for v in vs:
            v.rel_err = _rel(v.fn(), ref)
        run_interleaved(vs, rounds, min_sample_s=0.0)
    name = "DiT-XL/2" if depth == 28 else f"DiT-XL/2 widths, depth {depth}"
    return table(f"{name} forward, batch 2, 32x32x4 latent (256 tokens)", vs)


def bench_digits(rounds: int, min_sample_s: float) -> str:
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=32, patch_size=4, in_channels=1, hidden_size=192, depth=6, num_heads=3,
                    num_classes=10)
    model = DiT(cfg).eval()
    _randomize_zero_inits(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 1, 32, 32, generator=g)
    t = torch.full((20,), 500)
    y = torch.cat([torch.arange(10), torch.full((10,), 10)])

    def call(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return m.forward_with_cfg(x.to(dtype), t, y, cfg_scale=4.0, guide_channels=None)

    with torch.inference_mode():
        vs = _model_variants(model, call, with_bf16_parts=True)
        ref = call(model, torch.float32)
        for v in vs:
            v.rel_err = _rel(v.fn(), ref)
        run_interleaved(vs, rounds, min_sample_s)
    return table("digit model (32x32x1, patch 4, hidden 192, depth 6), one CFG step, batch 20", vs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["layers", "adaln", "dit", "digits", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="few rounds; DiT-XL/2 widths at depth 4")
    p.add_argument("--repeats", type=int, default=0, help="rounds (default 15 layers/digits, 5 dit; quick: 3/2)")
    p.add_argument("--depth", type=int, default=0, help="DiT depth for --mode dit (default 28; quick 4)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kernels {available_kernels()}",
          flush=True)
    small = args.repeats or (3 if args.quick else 15)
    big = args.repeats or (2 if args.quick else 5)
    depth = args.depth or (4 if args.quick else 28)
    sample = 0.05 if args.quick else 0.2
    if args.mode in ("layers", "all"):
        bench_layers(small, sample)
    if args.mode in ("adaln", "all"):
        print(bench_adaln(small, sample) + "\n", flush=True)
    if args.mode in ("digits", "all"):
        print(bench_digits(small, sample) + "\n", flush=True)
    if args.mode in ("dit", "all"):
        print(bench_dit(big, depth) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
