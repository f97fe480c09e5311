"""Time of ``ditas.quantize_`` (default ``ditas`` recipe: exact alpha search with every LoRA round)
on a PixArt-XL-shaped transformer with random weights: real width (16 heads x 72 = 1152, MLP
4608, T5 width 4096 captions of 120 tokens), but only ``--layers`` of the 28 blocks and 256 px
(256 image tokens), calibrated from ``--calls`` recorded calls of batch 2. No real weights are
reachable here, so this measures cost, not quality. Prints the wall time, per block, and peak RSS.

    OMP_NUM_THREADS=1 python benchmarks/pixart_xl_search_time.py [--layers 2] [--calls 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import family_models as fm  # noqa: E402

import ditas  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args()
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=args.layers, cross_attention_dim=1152, sample_size=32,
                                 caption_channels=4096, use_additional_conditions=False)
    fm.add_outliers(m)

    def call(step: int) -> dict:
        g = torch.Generator().manual_seed(step)
        return dict(hidden_states=torch.randn(2, 4, 32, 32, generator=g),
                    encoder_hidden_states=torch.randn(2, 120, 4096, generator=g),
                    timestep=torch.full((2,), 900.0 - 200 * step),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)

    with torch.no_grad(), ditas.record_calibration(m) as calib:
        for s in range(args.calls):
            m(**call(s))
    t0 = time.perf_counter()
    report = ditas.quantize_(m, ditas.recipe_config("ditas"), calib)
    wall = time.perf_counter() - t0
    print(f"PixArt-XL width, {args.layers} blocks ({report['num_layers']} smoothing groups), {args.calls} calls x batch 2 "
          f"x 256 tokens, {torch.get_num_threads()} thread(s): quantize_ {wall:.1f} s ({wall / args.layers:.1f} s per "
          f"block), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
