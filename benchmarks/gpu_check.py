"""One short check of ditas on a device (made for CUDA; runs on the CPU too, which is how it is tested).

On ``--device`` and on the CPU, side by side: (1) the embedded default model samples the same labels
and seed (per-sample noise is drawn on the CPU, so only float rounding may differ); (2) a
DiT-XL/2-shaped random model (``--big``) runs one forward; (3) the default model is quantized to
W4A8 with the DiTAS recipe (short calibration) and its forward is compared between the simulated
path and the ``int_mm`` kernel, and against the CPU; (4) the quantized model is saved and loaded on
the device and must give the same outputs bit for bit. Then, on a tiny random bf16 PixArt pipeline
(``gpu_pipeline_checks.py``), what a diffusers user does: (5) ``ditas.quantize_`` and sample (PSNR
vs the FP bf16 pipeline); (6) ``pipe.save_pretrained`` -> ``DiffusionPipeline.from_pretrained``,
bit-equal; (7) a peft LoRA made on the FP transformer, on the quantized one; (8)
``torch.compile`` of the quantized transformer vs eager; (9) the W4A4 recipe ``ditas_w4a4``
(INT4 per-token activations, online rotation) on ``int_mm`` vs simulated. Prints one table: times on the device and
on the CPU, the largest differences, and pass or fail (tolerances measured in the same run where
they can be); exit status 1 if a check fails. With ``--device cpu`` checks 5-8 run once.

Usage: ``python benchmarks/gpu_check.py [--device cuda] [--big DiT-XL/2] [--quick] [--skip lora,compile]
[--compile-backend aot_eager]`` (the names ``--skip`` takes: ``CHECKS``).
"""

from __future__ import annotations

import argparse
import importlib.util
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


CHECKS = ("sample", "big", "quantize", "bf16", "save_load", "lora", "compile", "w4a4")
PIPELINE_CHECKS = ("bf16", "save_load", "lora", "compile")


def run_checks(device: torch.device, big: str, quick: bool, skip: tuple[str, ...] = (),
               compile_backend: str = "inductor") -> list[dict]:
    """The table's rows for the checks not in ``skip`` (names of ``CHECKS``)."""
    rows = _model_checks(device, big, quick, skip)
    if any(c not in skip for c in PIPELINE_CHECKS):
        rows += _pipeline_rows(device, quick, skip, compile_backend)
    if "w4a4" not in skip:
        rows.append(_w4a4_row(device, quick))
    return rows


def _w4a4_row(device: torch.device, quick: bool) -> dict:
    """(9) ``ditas_w4a4`` (Hadamard rotation, SVD-first branch, GPTQ; INT4 per-token activations)
    quantized on the device: the ``int_mm`` kernel (4-bit codes in int8 products, the rotation
    online) against the simulated path, within the noise floor of a 1e-6 input change."""
    import ditas
    from ditas.quantization.apply import quantize
    from ditas.quantization.kernels import use_kernels
    from ditas.quantization.recipes import recipe_config

    cfg = recipe_config("ditas_w4a4", calib_labels=2 if quick else 4, steps=5 if quick else 20, lora_rank=8,
                        alpha_grid=(0.3, 0.5, 0.7))
    (model, _), t_q = timed(lambda: quantize(ditas.load_dit(device=device), cfg, progress=False), device)
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([5, 300, 600, 999]), torch.tensor([0, 3, 6, 9])
    with torch.no_grad():
        sim = model(x.to(device), t.to(device), y.to(device))
        g = torch.Generator().manual_seed(1)
        floor = max(float((fwd_perturbed(model, device, x, t, y, g) - sim).norm() / sim.norm()) for _ in range(3))
        use_kernels(model, "int_mm")
        out = model(x.to(device), t.to(device), y.to(device))
    rel = float((out - sim).norm() / sim.norm())
    return {"check": "W4A4 (ditas_w4a4): int_mm vs simulated", "device_s": t_q, "cpu_s": float("nan"),
            "max_diff": _maxdiff(out, sim), "rel_diff": rel, "floor": floor,
            "note": f"quantize time; relative (norm) {rel:.2g}, 1e-6 input noise floor {floor:.2g}",
            "ok": rel <= 2 * floor}


def _model_checks(device: torch.device, big: str, quick: bool, skip: tuple[str, ...]) -> list[dict]:
    """Checks 1-4, on ditas' own DiT models."""
    import ditas
    from ditas.quantization.apply import quantize
    from ditas.quantization.checkpoint import save_quantized
    from ditas.quantization.kernels import use_kernels
    from ditas.quantization.recipes import recipe_config

    cpu = torch.device("cpu")
    rows = []
    steps, n = (5, 8) if quick else (50, 64)

    if "sample" not in skip:
        rows.append(_sample_row(device, n, steps))
    if "big" not in skip:
        rows.append(_big_row(device, big))
    if "quantize" in skip:
        return rows

    # 3. quantization on the device, kernels compared
    cfg = recipe_config("ditas", calib_labels=2 if quick else 4, steps=5 if quick else 20, lora_rank=8,
                        lora_rounds=2 if quick else 5, alpha_grid=(0.3, 0.5, 0.7))
    qm, qtimes = {}, []  # the models by device type (the CPU's replaces the device's if it is the CPU: both
    for dev in (device, cpu):  # are the CPU's), the times by position
        (qm[dev.type], _), qt = timed(lambda: quantize(ditas.load_dit(device=dev), cfg, progress=False), dev)
        qtimes.append(qt)
    xq = torch.randn(4, 1, 32, 32)
    tq, yq = torch.tensor([5, 300, 600, 999]), torch.tensor([0, 3, 6, 9])

    def fwd(model, dev):
        with torch.no_grad():
            return model(xq.to(dev), tq.to(dev), yq.to(dev))

    sim_d, sim_c = fwd(qm[device.type], device), fwd(qm["cpu"], cpu)
    rows.append({"check": "quantize default model W4A8 (simulated)", "device_s": qtimes[0],
                 "cpu_s": qtimes[1], "max_diff": _maxdiff(sim_d, sim_c), "note": "forward, device vs CPU",
                 "ok": None})
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
                         f"|out| max {float(sim_d.abs().max()):.3g}", "ok": 0 < rel <= 2 * floor})

    # 4. save and load on the device: bit-exact
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_quantized(qm[device.type], Path(tmp) / "q", cfg)
        back, t_load = timed(lambda: ditas.load_dit(folder, device=device, kernel="int_mm"), device)
        again = fwd(back, device)
    rows.append({"check": "save + load on the device (int_mm)", "device_s": t_load, "cpu_s": float("nan"),
                 "max_diff": _maxdiff(again, int_d), "note": "must be 0",
                 "ok": _maxdiff(again, int_d) == 0})
    return rows


def _sample_row(device: torch.device, n: int, steps: int) -> dict:
    """1. the embedded default model samples the same labels and seed on the device and the CPU."""
    import ditas
    from ditas.diffusion.batches import generate
    from ditas.diffusion.images import decode_to_uint8

    cpu = torch.device("cpu")
    labels = torch.arange(n) % 10
    out, times = [], []  # [device, cpu] by position: with --device cpu both are the CPU
    for dev in (device, cpu):
        m = ditas.load_dit(device=dev)
        got, t = timed(lambda: generate(m, labels, steps=steps, seed=0, progress=False), dev)
        out.append(got)
        times.append(t)
    img_d, img_c = decode_to_uint8(m, out[0]), decode_to_uint8(m, out[1])
    return {"check": f"sample default model ({n} images, {steps} steps)", "device_s": times[0],
            "cpu_s": times[1], "max_diff": _maxdiff(out[0], out[1]),
            "note": f"{int((img_d != img_c).sum())} of {img_d.size} uint8 values differ", "ok": None}


def _big_row(device: torch.device, big: str) -> dict:
    """2. a DiT-XL/2-shaped random model, one forward on the device and on the CPU."""
    from ditas.model.dit import DiT_models

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    big_model = DiT_models[big]().eval()
    c = big_model.config
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size)
    t_in, y_in = torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        ref, t_cpu = timed(lambda: big_model(x, t_in, y_in), cpu)
        big_model.to(device)
        got, t_dev = timed(lambda: big_model(x.to(device), t_in.to(device), y_in.to(device)), device)
    return {"check": f"{big} random weights, one forward (batch 2)", "device_s": t_dev, "cpu_s": t_cpu,
            "max_diff": _maxdiff(got, ref), "note": f"|out| max {float(ref.abs().max()):.3g}", "ok": None}


def _pipeline_module():
    """``gpu_pipeline_checks.py`` beside this file (loaded by path: the script runs from anywhere
    and is loaded by path in the tests, with no sys.path change)."""
    spec = importlib.util.spec_from_file_location("gpu_pipeline_checks", Path(__file__).with_name(
        "gpu_pipeline_checks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pipeline_results(pc, folder: Path, dev: torch.device, quick: bool, skip: tuple[str, ...],
                      backend: str) -> dict:
    """Checks 5-8 on ``dev``: each one's measurements and its time on ``dev``."""
    (fp, q), t_quant = timed(lambda: pc.quantized_pipeline(folder, dev, torch.bfloat16, quick), dev)
    res = {}
    res["bf16"], t = timed(lambda: pc.bf16_quality(fp, q), dev)
    res["bf16_t"] = t_quant + t
    if "save_load" not in skip:
        res["save_load"], res["save_load_t"] = timed(lambda: pc.save_load(q, torch.bfloat16), dev)
    if "lora" not in skip:
        res["lora"], res["lora_t"] = timed(lambda: pc.lora(fp, q, res["bf16"]), dev)
    if "compile" not in skip:
        res["compile"], res["compile_t"] = timed(lambda: pc.compiled(q, backend), dev)
    return res


def _pipeline_rows(device: torch.device, quick: bool, skip: tuple[str, ...], backend: str) -> list[dict]:
    """Rows 5-8: the tiny bf16 PixArt pipeline on the device and (when the device is not the CPU)
    on the CPU; a check passes when it passes on both."""
    pc = _pipeline_module()
    devices = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    with tempfile.TemporaryDirectory() as tmp:
        pc.tiny_pixart_pipeline().save_pretrained(Path(tmp) / "fp")
        res = [_pipeline_results(pc, Path(tmp) / "fp", dev, quick, skip, backend) for dev in devices]
    makers = {"bf16": _bf16_row, "save_load": _save_load_row, "lora": _lora_row, "compile": _compile_row}
    rows = []
    for name in PIPELINE_CHECKS:
        if name in skip:
            continue
        row = makers[name]([r[name] for r in res])
        row.update(device_s=res[0][name + "_t"], cpu_s=res[-1][name + "_t"] if len(res) > 1 else float("nan"))
        rows.append(row)
    return rows


def _bf16_row(got: list[dict]) -> dict:
    """5. quantized bf16 pipeline vs FP bf16: as good on the device as on the CPU (1 dB), and far
    from what a broken model gives (a wrong dtype or uninitialised weights: under 10 dB)."""
    p = [g["psnr"] for g in got]
    return {"check": "bf16 PixArt pipeline: quantize_ W4A8 + sample", "psnr": p[0],
            "max_diff": _maxdiff(got[0]["q"], got[-1]["q"]),
            "note": "PSNR vs FP bf16 " + " / ".join(f"{x:.1f}" for x in p) + (" dB (device / cpu); diff: latents "
                    "device vs CPU" if len(p) > 1 else " dB"), "ok": p[0] >= p[-1] - 1.0 and min(p) > 20}


def _save_load_row(got: list[dict]) -> dict:
    """6. pipe.save_pretrained -> DiffusionPipeline.from_pretrained: quantized again, bit-equal."""
    return {"check": "save_pretrained -> DiffusionPipeline.from_pretrained",
            "max_diff": max(g["max_diff"] for g in got),
            "note": f"{got[0]['layers']} QuantLinear reloaded; must be 0",
            "ok": all(g["equal"] and g["layers"] > 0 for g in got)}


def _lora_row(got: list[dict]) -> dict:
    """7. the FP model's LoRA on the quantized one: it changes the output as on FP (far more than
    float rounding: under 60 dB) and quantized+LoRA stays within 1 dB of quantized's PSNR vs FP."""
    g = got[0]
    return {"check": "peft LoRA of the FP transformer on the quantized one", "max_diff": g["max_diff"],
            "psnr_lora": g["psnr_lora"], "psnr_base": g["psnr_base"],
            "note": f"PSNR q+LoRA vs FP+LoRA {g['psnr_lora']:.1f} dB (q vs FP {g['psnr_base']:.1f}); LoRA change "
                    f"{g['change_fp']:.1f} dB on FP, {g['change_q']:.1f} on q",
            "ok": all(x["psnr_lora"] >= x["psnr_base"] - 1.0 and max(x["change_fp"], x["change_q"]) < 60 for x in got)}


def _compile_row(got: list[dict]) -> dict:
    """8. torch.compile vs eager: within twice the output's move under a one-step bf16 input change."""
    g = got[0]
    return {"check": "torch.compile of the quantized transformer vs eager", "max_diff": g["max_diff"],
            "rel_diff": g["rel"], "floor": g["floor"],
            "note": f"relative (norm) {g['rel']:.2g}, bf16-step input floor {g['floor']:.2g}",
            "ok": all(0 < x["floor"] and x["rel"] <= 2 * x["floor"] for x in got)}


def fwd_perturbed(model, device, x, t, y, generator):
    """The simulated forward with the input moved by 1e-6 noise (the float-rounding floor)."""
    with torch.no_grad():
        return model((x + 1e-6 * torch.randn(x.shape, generator=generator)).to(device), t.to(device), y.to(device))


def print_table(rows: list[dict], device: torch.device) -> None:
    print(f"| check | {device} s | cpu s | max abs diff | pass | note |\n|---|---:|---:|---:|---|---|")
    for r in rows:
        cpu_s = "-" if r["cpu_s"] != r["cpu_s"] else f"{r['cpu_s']:.2f}"
        verdict = {None: "-", True: "ok", False: "FAIL"}[r["ok"]]
        print(f"| {r['check']} | {r['device_s']:.2f} | {cpu_s} | {r['max_diff']:.3g} | {verdict} | {r['note']} |")


def main(argv: list[str] | None = None) -> int:
    from ditas.devices import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--big", default="DiT-XL/2", help="the large random model's shape (default DiT-XL/2)")
    ap.add_argument("--quick", action="store_true", help="few images and steps, short calibration")
    ap.add_argument("--skip", type=_skip_list, default=(),
                    help=f"comma-separated checks to leave out: {','.join(CHECKS)}")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile check "
                    "(aot_eager: tracing only, no code generation; seconds instead of a minute on a CPU)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    rows = run_checks(device, args.big, args.quick, args.skip, args.compile_backend)
    print_table(rows, device)
    failed = [r["check"] for r in rows if r["ok"] is False]
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def _skip_list(text: str) -> tuple[str, ...]:
    """``--skip``'s names, each one of ``CHECKS`` (argparse turns the error into a usage line)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown check {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return names


if __name__ == "__main__":
    sys.exit(main())
