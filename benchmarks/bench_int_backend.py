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
- ``W4A8 +lora32, <route>``: ``QuantLinear.from_linear(..., WeightFormat(4), ActivationFormat(8))`` on the fastest
  integer kernel (``set_kernel``; oneDNN here), per-channel weights, per-tensor dynamic activations,
  random rank-32 LoRA factors, run by ``QuantLinear.forward`` (= the kernel entry's ``forward``, ``kernels/integer.py``), with
  the LoRA branch routed as ``ROUTES`` says: the down-projection apart in fp32 from the codes
  (``lora_limbs=0``, what the layer did before), or inside the integer product as 3 int8 limbs
  per row (the default, same numerics) or 1 (plain int8, an approximation); the up-projection in
  fp32 (``addmm_`` into the output) or bf16 (``lora_bf16``, an approximation); the factors held in
  bf16 (the ``ditas`` recipes' default storage) or fp32 (as fitted);
- ``W4A8 +lora32 (int_mm kernel)``: the default route on ``torch._int_mm``;
- ``W4A8 no LoRA``: the integer product alone (the ceiling the LoRA branch is measured against);
- ``W8A8``: 8-bit weights, same kernel, no LoRA; in models the adaLN linears of every integer
  variant are ``WeightOnlyInt8Linear``;
- ``torchao int8dyn``: ``torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())``
  on the fp32 model (all ``nn.Linear``; per-token dynamic int8 activations, int8 per-channel weights).

``--mode profile`` prints torch.profiler's self-CPU table of one forward of the default W4A8 model
and of the bf16 model (``--depth``, default 4 blocks), grouped by operator.

Memory: ``bytes`` = parameters + buffers + derived caches the variant keeps (the prepared int8
weight of the integer backend, torchao's inner tensors); ``peak+`` = rise of the process peak RSS
during one call above the RSS before it (after ``malloc_trim`` and a ``/proc/self/clear_refs``
reset), i.e. the transient memory of a call (activations, workspaces, temporary copies).

``--mode w4a4``: the four block linears at W4A4 against W4A8, all with rank-32 LoRA: INT4 per-token
activations on the integer kernel (with and without the online Hadamard rotation of ``ditas_w4a4``),
and the formats that run simulated (INT4 group 64, NVFP4).

Usage: ``python benchmarks/bench_int_backend.py [--mode layers|w4a4|adaln|dit|digits|profile|all] [--quick] [--repeats N]
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
from functools import cache, partial

import torch
import torch.nn as nn

from ditas.model.dit import DiT, DiTConfig, DiT_models
from ditas.quantization.kernels import KERNELS
from ditas.quantization.kernels.integer import DEFAULT_LORA_LIMBS
from ditas.quantization.config import ActivationFormat, WeightFormat
from ditas.quantization.linear import LORA_DTYPES, QuantLinear
from ditas.quantization.weight_only import WeightOnlyInt8Linear, quantize_adaln_weight_only
from machine import cpu_name


def available_kernels() -> tuple[str, ...]:
    """The integer kernels of the registry this torch build runs on the CPU, most preferred first."""
    return tuple(k.name for k in sorted(KERNELS.values(), key=lambda k: k.preference)
                 if k.holds_codes and k.available() and "cpu" in k.devices)

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
            st = m.kernel_state
            if st is not None and hasattr(st, "nbytes"):  # an integer kernel's prepared weight
                total += st.nbytes()
            elif getattr(st, "weight", None) is not None:  # the simulated kernel's cached float weight
                total += tensor_bytes(st.weight)
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


@dataclass(frozen=True)
class LoraRoute:
    """How an integer layer runs its LoRA branch (``QuantLinear`` attributes, see ``kernels/integer.py``)."""

    limbs: int = DEFAULT_LORA_LIMBS  # int8 limbs of the down rows in the main product (0: fp32 apart)
    up: str = "fp32"                 # up-projection: fp32 (addmm_ into the output) or bf16
    storage: str = "bfloat16"        # how the factors are held (the ditas recipes' default: bfloat16)


def quant_linear(linear: nn.Linear, wbits: int, lora: dict | None, kernel: str | None = None,
                 route: LoraRoute = LoraRoute(), activations: ActivationFormat = ActivationFormat(8, "tensor"),
                 weights: WeightFormat | None = None, rotation: int = 0) -> QuantLinear:
    m = QuantLinear.from_linear(linear, weights or WeightFormat(wbits), activations,
                                lora_dtype=LORA_DTYPES[route.storage], rotation=rotation, **(lora or {}))
    m.lora_limbs, m.lora_bf16 = route.limbs, route.up == "bf16"
    m.set_kernel(kernel or available_kernels()[0])
    return m


@cache
def have_torchao() -> bool:
    """torchao is optional (not a ditas dependency): its rows are left out, with a note, without it."""
    import importlib.util

    found = importlib.util.find_spec("torchao") is not None
    if not found:
        print("note: torchao is not installed; its rows are left out (pip install torchao)", flush=True)
    return found


def torchao_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def quantize_dit(model: DiT, wbits: int, lora: bool, seed: int = 0, route: LoraRoute = LoraRoute()) -> DiT:
    """Block linears -> integer QuantLinear (random rank-32 LoRA factors from ``seed``); adaLN ->
    weight-only int8 (in place)."""
    g = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        for name in BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, child)
            setattr(parent, child, quant_linear(lin, wbits, _lora(lin, g) if lora else None, route=route))
    quantize_adaln_weight_only(model)
    return model


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


ROUTES = {  # variant suffix -> LoRA route of the W4A8 +lora32 layer
    "LoRA down fp32 apart, fp32 factors (before)": LoraRoute(limbs=0, storage="float32"),
    "LoRA down in product, 3 limbs, fp32 factors": LoraRoute(limbs=3, storage="float32"),
    "LoRA down in product, 3 limbs, bf16 factors (default)": LoraRoute(limbs=3),
    "LoRA down in product, 1 limb": LoraRoute(limbs=1),
    "3 limbs, up bf16": LoraRoute(limbs=3, up="bf16"),
}


def _layer_cases(tokens: int):
    """Per block linear of ``LAYER_SHAPES`` (seeded): (role, in, out, the fp32 linear, an input of
    ``tokens`` rows, random rank-32 LoRA factors, [fp32, bf16] variants)."""
    g = torch.Generator().manual_seed(0)
    for lname, (k, n) in LAYER_SHAPES.items():
        lin = nn.Linear(k, n)
        x = torch.randn(tokens, k, generator=g)
        lin_bf = copy.deepcopy(lin).bfloat16()
        xb = x.bfloat16()
        lora = _lora(lin, g)
        yield lname, k, n, lin, x, lora, [Variant("fp32", partial(lin, x), lin), Variant("bf16", partial(lin_bf, xb), lin_bf)]


def _measure_layer(title: str, lin: nn.Linear, x: torch.Tensor, vs: list[Variant], rounds: int,
                   min_sample_s: float) -> str:
    """Errors against ``lin(x)``, then the interleaved timing of ``vs``: the table, also printed."""
    with torch.inference_mode():
        ref = lin(x)
        for v in vs:
            v.rel_err = _rel(v.fn(), ref)
        run_interleaved(vs, rounds, min_sample_s)
    out = table(title, vs)
    print(out + "\n", flush=True)
    return out


def bench_layers(rounds: int, min_sample_s: float, tokens: int = 512) -> str:
    out = []
    kernels = available_kernels()
    for lname, k, n, lin, x, lora, vs in _layer_cases(tokens):
        for label, route in ROUTES.items():
            m = quant_linear(lin, 4, lora, route=route)
            vs.append(Variant(f"W4A8 +lora32, {label}", partial(m, x), m))
        if "onednn" in kernels:
            mm = quant_linear(lin, 4, lora, kernel="int_mm")
            vs.append(Variant("W4A8 +lora32 (int_mm kernel)", partial(mm, x), mm))
        w4 = quant_linear(lin, 4, None)
        w8 = quant_linear(lin, 8, None)
        vs += [Variant("W4A8 no LoRA", partial(w4, x), w4), Variant("W8A8", partial(w8, x), w8)]
        if have_torchao():
            ao = torchao_int8(nn.Sequential(copy.deepcopy(lin)))
            vs.append(Variant("torchao int8dyn", lambda: ao(x), ao))
        out.append(_measure_layer(f"{lname} {k}->{n}, M={tokens}", lin, x, vs, rounds, min_sample_s))
    return "\n\n".join(out)


def bench_w4a4(rounds: int, min_sample_s: float, tokens: int = 512) -> str:
    """W4A4 against W4A8 on the four DiT-XL/2 block linears, all with rank-32 LoRA (bf16 factors):
    INT4 per-token activations on the integer kernel (4-bit codes in int8 products), the same with
    ``ditas_w4a4``'s online Hadamard rotation, and the formats that run simulated (INT4 group 64,
    NVFP4), with W4A8 on the simulated kernel as the simulated path's own baseline."""
    out = []
    kernel = available_kernels()[0]
    for lname, k, n, lin, x, lora, vs in _layer_cases(tokens):
        block = k & -k  # the largest power of two dividing the width: rotation.py's Hadamard block
        layers = {
            f"W4A8 per tensor ({kernel})": quant_linear(lin, 4, lora),
            f"W4A4 per token ({kernel})": quant_linear(lin, 4, lora, activations=ActivationFormat(4, "token")),
            f"W4A4 per token + Hadamard {block} ({kernel})": quant_linear(
                lin, 4, lora, activations=ActivationFormat(4, "token"), rotation=block),
            "W4A8 per tensor (simulated)": quant_linear(lin, 4, lora, kernel="simulated"),
            "W4A4 INT4 group 64 (simulated)": quant_linear(lin, 4, lora, kernel="simulated",
                                                          activations=ActivationFormat(4, "group", group_size=64)),
            "W4A4 NVFP4 (simulated)": quant_linear(lin, 4, lora, kernel="simulated", weights=WeightFormat(4, format="nvfp4"),
                                                  activations=ActivationFormat(4, format="nvfp4")),
        }
        vs += [Variant(name, partial(m, x), m) for name, m in layers.items()]
        out.append(_measure_layer(f"{lname} {k}->{n}, M={tokens}, rank-32 LoRA", lin, x, vs, rounds, min_sample_s))
    return "\n\n".join(out)


def bench_adaln(rounds: int, min_sample_s: float, batch: int = 2) -> str:
    """The adaLN modulation linear (1152 -> 6 x 1152) on the conditioning vectors of a batch."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(1152, 6 * 1152)
    x = torch.randn(batch, 1152, generator=g)
    lin_bf = copy.deepcopy(lin).bfloat16()
    xb = x.bfloat16()
    wo = WeightOnlyInt8Linear.from_linear(lin)
    wo32 = WeightOnlyInt8Linear.from_linear(lin, compute="fp32")
    vs = [Variant("fp32", lambda: lin(x), lin), Variant("bf16", lambda: lin_bf(xb), lin_bf),
          Variant("WeightOnlyInt8Linear (bf16 compute)", lambda: wo(x), wo),
          Variant("WeightOnlyInt8Linear (fp32 compute)", lambda: wo32(x), wo32)]
    if have_torchao():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        ao = nn.Sequential(copy.deepcopy(lin))
        quantize_(ao, Int8WeightOnlyConfig())
        vs.append(Variant("torchao Int8WeightOnlyConfig", lambda: ao(x), ao))
    with torch.inference_mode():
        ref = lin(x)
        for v in vs:
            v.rel_err = _rel(v.fn(), ref)
        run_interleaved(vs, rounds, min_sample_s)
    return table(f"adaLN modulation linear 1152->6912, M={batch}", vs)


def _model_variants(model: DiT, call: Callable[[nn.Module, torch.dtype], torch.Tensor], routes: dict[str, LoraRoute]
                    ) -> list[Variant]:
    """fp32, bf16, W4A8 +lora32 for each LoRA route (same random factors), W4A8 without LoRA, W8A8,
    torchao: built from one random model. Routes that differ only in the up-projection share a model
    (the flags are read per call; their prepared extras are cached side by side)."""
    model_bf = copy.deepcopy(model).bfloat16()
    by_limbs: dict[tuple[int, str], DiT] = {}
    vs = [Variant("fp32", partial(call, model, torch.float32), model),
          Variant("bf16", partial(call, model_bf, torch.bfloat16), model_bf)]

    def run(m: nn.Module, route: LoraRoute) -> torch.Tensor:
        for layer in m.modules():
            if isinstance(layer, QuantLinear):
                layer.lora_bf16 = route.up == "bf16"
        return call(m, torch.float32)

    for label, route in routes.items():
        key = (route.limbs, route.storage)
        if key not in by_limbs:
            by_limbs[key] = quantize_dit(copy.deepcopy(model), 4, lora=True, seed=1, route=route)
        w4 = by_limbs[key]
        vs.append(Variant(f"W4A8 +lora32, {label}", partial(run, w4, route), w4))
    w4n = quantize_dit(copy.deepcopy(model), 4, lora=False, seed=1)
    w8 = quantize_dit(copy.deepcopy(model), 8, lora=False, seed=2)
    vs += [Variant("W4A8 no LoRA", partial(call, w4n, torch.float32), w4n),
           Variant("W8A8", partial(call, w8, torch.float32), w8)]
    if have_torchao():
        ao = torchao_int8(copy.deepcopy(model))
        vs.append(Variant("torchao int8dyn (all Linear)", partial(call, ao, torch.float32), ao))
    gc.collect()
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
        vs = _model_variants(model, call, ROUTES)
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
        vs = _model_variants(model, call, {k: v for k, v in ROUTES.items() if v.up == "fp32"})
        ref = call(model, torch.float32)
        for v in vs:
            v.rel_err = _rel(v.fn(), ref)
        run_interleaved(vs, rounds, min_sample_s)
    return table("digit model (32x32x1, patch 4, hidden 192, depth 6), one CFG step, batch 20", vs)


def xl_width_dit(depth: int) -> tuple[DiT, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random DiT at DiT-XL/2 widths with ``depth`` blocks (non-zero adaLN) and its inputs
    (batch 2, 32x32x4 latent: 256 tokens)."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=depth, hidden_size=1152, num_heads=16, patch_size=2)).eval()
    _randomize_zero_inits(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=g)
    return model, x, torch.tensor([500, 20]), torch.tensor([3, 1000])


def profile_dit(depth: int, rows: int = 18) -> str:
    """Self-CPU time per operator of one forward: the default W4A8 +lora32 model, then bf16."""
    from torch.profiler import ProfilerActivity, profile

    model, x, t, y = xl_width_dit(depth)
    out = []
    with torch.inference_mode():
        model_bf = copy.deepcopy(model).bfloat16()
        w4 = quantize_dit(model, 4, lora=True, seed=1)
        for name, m, dtype in (("W4A8 +lora32 (default route)", w4, torch.float32), ("bf16", model_bf, torch.bfloat16)):
            for _ in range(2):
                m(x.to(dtype), t, y)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    m(x.to(dtype), t, y)
            out.append(f"**{name}, depth {depth}, 3 forwards**\n\n```\n"
                       + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows) + "\n```")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["layers", "w4a4", "adaln", "dit", "digits", "profile", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="few rounds; DiT-XL/2 widths at depth 4")
    p.add_argument("--repeats", type=int, default=0, help="rounds (default 15 layers/digits, 5 dit; quick: 3/2)")
    p.add_argument("--depth", type=int, default=0, help="DiT depth for --mode dit (default 28; quick 4)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU {cpu_name()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"kernels {available_kernels()}", flush=True)
    small = args.repeats or (3 if args.quick else 15)
    big = args.repeats or (2 if args.quick else 5)
    depth = args.depth or (4 if args.quick else 28)
    sample = 0.05 if args.quick else 0.2
    if args.mode in ("layers", "all"):
        bench_layers(small, sample)
    if args.mode in ("w4a4", "all"):
        bench_w4a4(small, sample)
    if args.mode in ("adaln", "all"):
        print(bench_adaln(small, sample) + "\n", flush=True)
    if args.mode in ("digits", "all"):
        print(bench_digits(small, sample) + "\n", flush=True)
    if args.mode in ("dit", "all"):
        print(bench_dit(big, depth) + "\n", flush=True)
    if args.mode == "profile":
        print(profile_dit(args.depth or 4), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
