"""Peak memory of a block-wise calibration through the generic adapter, against model depth.

    PYTHONPATH=src .venv/bin/python benchmarks/generic_memory.py            # depth 4 and 16, ~3 min
    PYTHONPATH=src .venv/bin/python benchmarks/generic_memory.py --cache    # recorded calls on disk

Each depth runs in a fresh process (peak RSS is per process): a wide tiny PixArt (8 heads x 64 =
512 wide, 256 tokens, random weights) records ``--steps`` calls of batch 2 through
``ditas.record_calibration`` (the probe finds one segment: only block 0's calls are kept), then
``quantization.apply.calibrate`` runs block by block through the generic adapter (rtn: the
calibration path of every recipe, without the alpha search's CPU time). The table gives the
float model's size, one block's recorded inputs (what is kept) and all blocks' (what recording
every block would keep), the resident memory before calibration and the peak during it (Linux:
``/proc/self/clear_refs`` resets the peak before calibration), and the per-layer results the
calibration returns (integer codes, scales: they grow with depth by design, convert needs them).
What the issue asks: the extra memory minus those results must not grow with depth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(depth: int, steps: int, cache: str | None) -> dict:
    """One measurement, in this process."""
    import ditas
    from diffusers import PixArtTransformer2DModel
    from ditas.quantization.apply import calibrate

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=depth, cross_attention_dim=512, sample_size=32, patch_size=2,
                                 caption_channels=64, norm_num_groups=1, use_additional_conditions=False).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), ditas.record_calibration(m, calib_cache=cache) as calib:
        for s in range(steps):
            m(torch.randn(2, 4, 32, 32, generator=g), encoder_hidden_states=torch.randn(2, 8, 64, generator=g),
              timestep=torch.full((2,), 900.0 - 100 * s), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              return_dict=False)
    params_mb = sum(p.numel() * p.element_size() for p in m.parameters()) / 2 ** 20
    first = calib.calls[0]
    call_mb = sum(t.numel() * t.element_size() for t in list(first.args) + list(first.kwargs.values())
                  if isinstance(t, torch.Tensor)) / 2 ** 20
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    before = _rss_mb("VmRSS")
    cal = calibrate(m, ditas.recipe_config("rtn", adapter="generic"), calib, progress=False)
    peak = _rss_mb("VmHWM")
    results_mb = sum(t.numel() * t.element_size() for r in cal.layers.values()
                     for t in (*r.codes, r.smooth, r.bias, r.lora_up, r.lora_down) if t is not None) / 2 ** 20
    one_block = call_mb * len(calib.calls)
    return {"depth": depth, "steps": steps, "cache": bool(cache), "model_mb": round(params_mb, 1),
            "one_block_inputs_mb": round(one_block, 1), "all_blocks_inputs_mb": round(one_block * depth, 1),
            "rss_before_mb": round(before, 1), "peak_mb": round(peak, 1), "extra_mb": round(peak - before, 1),
            "layer_results_mb": round(results_mb, 1), "extra_minus_results_mb": round(peak - before - results_mb, 1),
            "segments": len(calib.structure.segment_starts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="4,16")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cache", action="store_true", help="stream the recorded calls to a temporary folder")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.steps, args.cache_dir)))
        return
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in [int(v) for v in args.depths.split(",")]:
            cmd = [sys.executable, __file__, "--one", str(d), "--steps", str(args.steps)]
            if args.cache:
                cmd += ["--cache-dir", tmp]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
