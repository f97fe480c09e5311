"""Size breakdown of a W4A8 DiT checkpoint against the fp32 file, computed from the model's shapes.

The model is built on the ``meta`` device (no memory, no weights); every tensor is counted at the
storage precision a choice gives it:

- block linears (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``): ``qweight`` packed to
  ``wbits`` (``packing.packed_numel``), per-channel ``wscale`` and bias in fp32, ``wzero`` in uint8
  (exact integers; checkpoint format 3), the
  unfoldable ``smooth`` vector of ``fc2`` in fp32, rank-``r`` LoRA factors in fp32 or bf16
  (``QuantLinear``'s ``lora_dtype``, recorded per layer since checkpoint format 2);
- adaLN modulation linears: int8 weight-only (+ fp32 per-channel scale and bias), or fp32;
- everything else (patch/time/label embedders, positional embedding, final linear): fp32.

``--real DIR`` also writes real folders under DIR: the fp32 model (``save_dit``) and its W4A8
quantized form (every block linear ``QuantLinear.from_linear`` with random rank-``r`` LoRA factors in
``--lora-dtype``, adaLN linears ``WeightOnlyInt8Linear``, saved by ``save_quantized``), then prints the bytes of each
part as stored in the safetensors file, loads the quantized folder back and runs one forward,
reporting the peak RSS of that load (it never builds a float weight for a quantized layer).

Usage: ``python benchmarks/checkpoint_size.py [--model DiT-XL/2] [--wbits 4] [--rank 32] [--real DIR]
[--lora-dtype bfloat16|float32]``
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path

import torch

from ditas.model.dit import DiT_models
from ditas.quantization.linear import LORA_DTYPES
from ditas.quantization.packing import packed_numel

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
MB = 1e6


def breakdown(model_name: str, wbits: int, rank: int, lora_bytes: int, adaln_int8: bool) -> dict[str, float]:
    with torch.device("meta"):
        model = DiT_models[model_name]()
    sizes = {"packed qweight": 0.0, "wscale+bias (fp32), wzero (uint8)": 0.0, "smooth fc2 (fp32)": 0.0,
             f"LoRA r={rank} ({'bf16' if lora_bytes == 2 else 'fp32'})": 0.0,
             "adaLN weights" + (" (int8)" if adaln_int8 else " (fp32)"): 0.0, "adaLN scale+bias (fp32)": 0.0,
             "embedders, pos_embed, final linear (fp32)": 0.0}
    keys = list(sizes)
    fp32_total = sum(p.numel() for p in model.parameters()) * 4
    quantized = set()
    for block_name, block in model.named_modules():
        if not block_name.startswith("blocks.") or block_name.count(".") != 1:
            continue
        for name in BLOCK_LINEARS:
            lin = block.get_submodule(name)
            n, k = lin.weight.shape
            sizes[keys[0]] += packed_numel(n * k, wbits)
            sizes[keys[1]] += 2 * n * 4 + n  # checkpoint format 3 stores the integer zero points as uint8
            if name == "mlp.fc2":
                sizes[keys[2]] += k * 4
            sizes[keys[3]] += rank * (n + k) * lora_bytes
            quantized.update({f"{block_name}.{name}.weight", f"{block_name}.{name}.bias"})
    for pname, p in model.named_parameters():
        if pname in quantized:
            continue
        if "adaLN_modulation" in pname:
            if pname.endswith("weight"):
                sizes[keys[4]] += p.numel() * (1 if adaln_int8 else 4)
                if adaln_int8:
                    sizes[keys[5]] += p.shape[0] * 4
            else:
                sizes[keys[5]] += p.numel() * 4
        else:
            sizes[keys[6]] += p.numel() * 4
    sizes["total"] = sum(sizes.values())
    sizes["fp32 file"] = fp32_total
    return sizes


def stored_parts(safetensors_file: Path) -> dict[str, int]:
    """Bytes per part of a ditas quantized ``model.safetensors``, read from its header."""
    with open(safetensors_file, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    parts: dict[str, int] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        leaf = key.rsplit(".", 1)[-1]
        lora = f"LoRA factors ({info['dtype'].lower()})"
        if "adaLN_modulation" in key:
            part = "adaLN weights (int8)" if leaf == "qweight" else "adaLN scale+bias (fp32)"
        elif any(f".{n}." in key for n in BLOCK_LINEARS) and leaf != "weight":
            part = {"qweight": "packed qweight", "smooth": "smooth fc2 (fp32)", "lora_down": lora,
                    "lora_up": lora}.get(leaf, "wscale+bias (fp32), wzero (uint8)")
        else:
            part = "embedders, pos_embed, final linear (fp32)"
        parts[part] = parts.get(part, 0) + nbytes
    return parts


def write_real(model_name: str, wbits: int, rank: int, out: Path, lora_dtype: str) -> None:
    from ditas.model.loading import save_dit
    from ditas.quantization.checkpoint import save_quantized
    from ditas.quantization.config import ActivationFormat, WeightFormat
    from ditas.quantization.linear import QuantLinear
    from ditas.quantization.weight_only import quantize_adaln_weight_only

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    model = DiT_models[model_name]()
    save_dit(model, out / "fp32")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for name in BLOCK_LINEARS:
                parent_name, _, child = name.rpartition(".")
                lin = block.get_submodule(name)
                down = torch.randn(rank, lin.in_features, generator=g) * 0.01
                up = torch.randn(lin.out_features, rank, generator=g) * 0.01
                smooth = torch.rand(lin.in_features, generator=g) + 0.5 if name == "mlp.fc2" else None
                q = QuantLinear.from_linear(lin, WeightFormat(wbits), ActivationFormat(8), lora_down=down, lora_up=up, smooth=smooth,
                                            lora_dtype=LORA_DTYPES[lora_dtype])
                setattr(block.get_submodule(parent_name), child, q)
        quantize_adaln_weight_only(model)
    save_quantized(model, out / "w4a8", {"recipe": "random-codes"})
    del model
    fp32_bytes = (out / "fp32" / "model.safetensors").stat().st_size
    q_bytes = (out / "w4a8" / "model.safetensors").stat().st_size
    print(f"**Real files under {out}: {model_name} W{wbits}A8, LoRA r={rank} {lora_dtype}, adaLN int8**\n")
    print("| part (as stored) | MB | % of fp32 file |\n|---|---:|---:|")
    for part, nbytes in sorted(stored_parts(out / "w4a8" / "model.safetensors").items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {nbytes / MB:.1f} | {100 * nbytes / fp32_bytes:.2f} |")
    print(f"| **file `w4a8/model.safetensors`** | **{q_bytes / MB:.1f}** | **{100 * q_bytes / fp32_bytes:.2f}** |")
    print(f"| file `fp32/model.safetensors` | {fp32_bytes / MB:.1f} | 100 |\n")
    # load in a fresh process so its peak RSS is the load's own
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child would report this process's peak
    hwm = "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024)"
    code = ("import torch, ditas; m = ditas.load_dit(%r, kernel='auto'); c = m.config; "
            "x = torch.randn(2, c.in_channels, c.input_size, c.input_size); "
            "torch.set_grad_enabled(False); m(x, torch.tensor([1, 500]), torch.tensor([1, 2])); " + hwm) % str(out / "w4a8")
    def peak_mb(snippet: str) -> float:
        return float(subprocess.run([sys.executable, "-c", snippet], check=True, capture_output=True,
                                    text=True).stdout)

    peak = peak_mb(code)
    base = peak_mb("import torch, ditas; " + hwm)
    print(f"load + one forward (batch 2, int backend) in a fresh process: peak RSS {peak:.0f} MB, of which "
          f"{base:.0f} MB is `import torch, ditas` alone: {peak - base:.0f} MB for the model "
          f"(its fp32 weights alone would be {fp32_bytes / MB:.0f} MB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-XL/2", choices=sorted(DiT_models))
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--real", type=Path, help="also write real fp32 and W4A8 folders here and measure them")
    ap.add_argument("--lora-dtype", choices=sorted(LORA_DTYPES), default=None,
                    help="LoRA factors of the real W4A8 folder (default: what a new quantization uses)")
    args = ap.parse_args(argv)
    configs = [("LoRA bf16, adaLN int8 (the ditas recipe's default)", 2, True), ("LoRA fp32, adaLN int8", 4, True),
               ("LoRA bf16, adaLN fp32", 2, False), ("LoRA fp32, adaLN fp32", 4, False)]
    for title, lora_bytes, adaln_int8 in configs:
        s = breakdown(args.model, args.wbits, args.rank, lora_bytes, adaln_int8)
        fp32 = s.pop("fp32 file")
        print(f"**{args.model} W{args.wbits}A8, {title}**\n\n| part | MB | % of fp32 file |\n|---|---:|---:|")
        for k, v in s.items():
            print(f"| {k} | {v / MB:.1f} | {100 * v / fp32:.2f} |")
        print(f"| fp32 file | {fp32 / MB:.1f} | 100 |\n")
    if args.real:
        from ditas.quantization.recipes import recipe_config

        write_real(args.model, args.wbits, args.rank, args.real, args.lora_dtype or recipe_config("ditas").lora.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
