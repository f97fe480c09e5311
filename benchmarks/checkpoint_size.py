"""Size breakdown of a W4A8 DiT checkpoint against the fp32 file, computed from the model's shapes.

The model is built on the ``meta`` device (no memory, no weights); every tensor is counted at the
storage precision a choice gives it:

- block linears (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``): ``qweight`` packed to
  ``wbits`` (``packing.packed_numel``), per-channel ``wscale``/``wzero`` and bias in fp32, the
  unfoldable ``smooth`` vector of ``fc2`` in fp32, rank-``r`` LoRA factors in fp32 or fp16;
- adaLN modulation linears: int8 weight-only (+ fp32 per-channel scale and bias), or fp32;
- everything else (patch/time/label embedders, positional embedding, final linear): fp32.

Usage: ``python benchmarks/checkpoint_size.py [--model DiT-XL/2] [--wbits 4] [--rank 32]``
"""

from __future__ import annotations

import argparse
import sys

import torch

from ditas.model.dit import DiT_models
from ditas.quantization.packing import packed_numel

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
MB = 1e6


def breakdown(model_name: str, wbits: int, rank: int, lora_bytes: int, adaln_int8: bool) -> dict[str, float]:
    with torch.device("meta"):
        model = DiT_models[model_name]()
    sizes = {"packed qweight": 0.0, "wscale+wzero+bias (fp32)": 0.0, "smooth fc2 (fp32)": 0.0,
             f"LoRA r={rank} ({'fp16' if lora_bytes == 2 else 'fp32'})": 0.0,
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
            sizes[keys[1]] += (2 * n + n) * 4
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-XL/2", choices=sorted(DiT_models))
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args(argv)
    configs = [("LoRA fp32, adaLN int8", 4, True), ("LoRA fp16, adaLN int8", 2, True),
               ("LoRA fp16, adaLN fp32", 2, False), ("LoRA fp32, adaLN fp32", 4, False)]
    for title, lora_bytes, adaln_int8 in configs:
        s = breakdown(args.model, args.wbits, args.rank, lora_bytes, adaln_int8)
        fp32 = s.pop("fp32 file")
        print(f"**{args.model} W{args.wbits}A8, {title}**\n\n| part | MB | % of fp32 file |\n|---|---:|---:|")
        for k, v in s.items():
            print(f"| {k} | {v / MB:.1f} | {100 * v / fp32:.2f} |")
        print(f"| fp32 file | {fp32 / MB:.1f} | 100 |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
