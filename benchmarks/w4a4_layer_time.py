"""Paired timing of quantize_layer (docs/quantization.md, "W4A4"): ditas W4A8 vs the W4A4 recipes on the
(50 steps x 512 tokens of synthetic inputs with outlier channels), interleaved, one thread."""
import time, torch, sys
from ditas.quantization.recipes import recipe_config
from ditas.quantization.search import quantize_layer
from ditas.calibration.inputs import LayerInputs
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
def inputs(width):
    scale = torch.where(torch.rand(width, generator=g) < 0.03, 15.0, 1.0)
    xs = [torch.randn(512, width, generator=g) * scale for _ in range(50)]
    return LayerInputs(xs, torch.stack([x.amin(0) for x in xs]), torch.stack([x.amax(0) for x in xs]),
                       torch.stack([x.abs().amax(0) for x in xs]).amax(0))
shapes = [("qkv", 192, 576), ("proj", 192, 192), ("fc1", 192, 768), ("fc2", 768, 192)]
cfgs = {"ditas@w4a8": recipe_config("ditas"), "ditas@w4a4(token)": recipe_config("ditas", a_bits=4, act_granularity="token"),
        "ditas_w4a4": recipe_config("ditas_w4a4")}
for extra in sys.argv[1:]:
    cfgs[extra] = recipe_config(extra, a_bits=4, act_granularity="token")
tot = {k: 0.0 for k in cfgs}
for role, i, o in shapes:
    inp = inputs(i); w = torch.randn(o, i, generator=g) * 0.05; b = torch.randn(o, generator=g) * 0.1
    for k, c in cfgs.items():
        t = time.perf_counter(); r = quantize_layer(role, role, w, b, inp, c); dt = time.perf_counter() - t
        tot[k] += dt
        print(role, k, f"{dt:.1f}s", f"rel_out_err={r.rel_out_err:.4g}", flush=True)
print({k: round(v, 1) for k, v in tot.items()}, {k: round(v / tot["ditas@w4a8"], 2) for k, v in tot.items()})
