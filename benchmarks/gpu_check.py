"""One short check of ditas on a device (made for CUDA; runs on the CPU too, which is how it is tested).

On ``--device`` and on the CPU, side by side: (1) the embedded default model samples the same labels
and seed (per-sample noise is drawn on the CPU, so only float rounding may differ); (2) a
DiT-XL/2-shaped random model (``--big``) runs one forward; (3) the default model is quantized to
W4A8 with the DiTAS recipe (short calibration) and its forward is compared between the simulated
path and the ``int_mm`` kernel, and against the CPU; (4) the quantized model is saved and loaded on
the device and must give the same outputs bit for bit. Prints one table: times on the device and
on the CPU, and the largest differences.

Usage: ``python benchmarks/gpu_check.py [--device cuda] [--big DiT-XL/2] [--quick]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def run_checks(device: torch.device, big: str, quick: bool) -> list[dict]:
    import ditas
    from ditas.diffusion.images import decode_to_uint8, generate
    from ditas.model.dit import DiT_models
    from ditas.quantization.apply import quantize
    from ditas.quantization.checkpoint import save_quantized
    from ditas.quantization.kernels import use_kernels
    from ditas.quantization.recipes import recipe_config

    cpu = torch.device("cpu")
    rows = []
    steps, n = (5, 8) if quick else (50, 64)

    # 1. sampling the default model
    labels = torch.arange(n) % 10
    out = {}
    for dev in (device, cpu):
        m = ditas.load_dit(device=dev)
        out[dev.type], t = timed(lambda: generate(m, labels, steps=steps, seed=0, progress=False), dev)
        out[dev.type + "_t"] = t
    img_d, img_c = decode_to_uint8(m, out[device.type]), decode_to_uint8(m, out["cpu"])
    rows.append({"check": f"sample default model ({n} images, {steps} steps)", "device_s": out[device.type + "_t"],
                 "cpu_s": out["cpu_t"], "max_diff": _maxdiff(out[device.type], out["cpu"]),
                 "note": f"{int((img_d != img_c).sum())} of {img_d.size} uint8 values differ"})

    # 2. a DiT-XL/2-shaped random model, one forward
    torch.manual_seed(0)
    big_model = DiT_models[big]().eval()
    c = big_model.config
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size)
    t_in, y_in = torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        ref, t_cpu = timed(lambda: big_model(x, t_in, y_in), cpu)
        big_model.to(device)
        got, t_dev = timed(lambda: big_model(x.to(device), t_in.to(device), y_in.to(device)), device)
    rows.append({"check": f"{big} random weights, one forward (batch 2)", "device_s": t_dev, "cpu_s": t_cpu,
                 "max_diff": _maxdiff(got, ref), "note": f"|out| max {float(ref.abs().max()):.3g}"})
    del big_model

    # 3. quantization on the device, kernels compared
    cfg = recipe_config("ditas", calib_labels=2 if quick else 4, steps=5 if quick else 20, lora_rank=8,
                        lora_rounds=2 if quick else 5, alpha_grid=(0.3, 0.5, 0.7))
    qm = {}
    for dev in (device, cpu):
        (qm[dev.type], _), qt = timed(lambda: quantize(ditas.load_dit(device=dev), cfg, progress=False), dev)
        qm[dev.type + "_t"] = qt
    xq = torch.randn(4, 1, 32, 32)
    tq, yq = torch.tensor([5, 300, 600, 999]), torch.tensor([0, 3, 6, 9])

    def fwd(model, dev):
        with torch.no_grad():
            return model(xq.to(dev), tq.to(dev), yq.to(dev))

    sim_d, sim_c = fwd(qm[device.type], device), fwd(qm["cpu"], cpu)
    rows.append({"check": "quantize default model W4A8 (simulated)", "device_s": qm[device.type + "_t"],
                 "cpu_s": qm["cpu_t"], "max_diff": _maxdiff(sim_d, sim_c), "note": "forward, device vs CPU"})
    # the noise floor: a per-tensor activation code flips when its input moves by 1e-6, and the
    # integer kernel's rounding differs from the simulated path's by that much
    g = torch.Generator().manual_seed(1)
    floor = max(float((fwd_perturbed(qm[device.type], device, xq, tq, yq, g) - sim_d).norm() / sim_d.norm())
                for _ in range(3))
    use_kernels(qm[device.type], "int_mm")
    (int_d, t_int) = timed(lambda: fwd(qm[device.type], device), device)
    rel = float((int_d - sim_d).norm() / sim_d.norm())
    rows.append({"check": "int_mm kernel vs simulated, same device", "device_s": t_int, "cpu_s": float("nan"),
                 "max_diff": _maxdiff(int_d, sim_d), "rel_diff": rel, "floor": floor,
                 "note": f"relative (norm) {rel:.2g}, 1e-6 input noise floor {floor:.2g}; "
                         f"|out| max {float(sim_d.abs().max()):.3g}"})

    # 4. save and load on the device: bit-exact
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_quantized(qm[device.type], Path(tmp) / "q", cfg)
        back, t_load = timed(lambda: ditas.load_dit(folder, device=device, kernel="int_mm"), device)
        again = fwd(back, device)
    rows.append({"check": "save + load on the device (int_mm)", "device_s": t_load, "cpu_s": float("nan"),
                 "max_diff": _maxdiff(again, int_d), "note": "must be 0"})
    return rows


def fwd_perturbed(model, device, x, t, y, generator):
    """The simulated forward with the input moved by 1e-6 noise (the float-rounding floor)."""
    with torch.no_grad():
        return model((x + 1e-6 * torch.randn(x.shape, generator=generator)).to(device), t.to(device), y.to(device))


def print_table(rows: list[dict], device: torch.device) -> None:
    print(f"| check | {device} s | cpu s | max abs diff | note |\n|---|---:|---:|---:|---|")
    for r in rows:
        cpu_s = "-" if r["cpu_s"] != r["cpu_s"] else f"{r['cpu_s']:.2f}"
        print(f"| {r['check']} | {r['device_s']:.2f} | {cpu_s} | {r['max_diff']:.3g} | {r['note']} |")


def main(argv: list[str] | None = None) -> int:
    from ditas.devices import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--big", default="DiT-XL/2", help="the large random model's shape (default DiT-XL/2)")
    ap.add_argument("--quick", action="store_true", help="few images and steps, short calibration")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    rows = run_checks(device, args.big, args.quick)
    print_table(rows, device)
    if rows[-1]["max_diff"] != 0:
        print("FAILED: save + load changed the outputs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
