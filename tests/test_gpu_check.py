"""``benchmarks/gpu_check.py`` runs here on the CPU (and, marked ``cuda``, on a GPU where there is one).

The CPU run is made once for the module: ditas' DiT checks, then the diffusers-user checks on a
tiny bf16 PixArt pipeline (quantize_ + sample, save_pretrained -> from_pretrained, a peft LoRA,
torch.compile; the compile row with the ``aot_eager`` backend here: inductor on the CPU takes a
minute and is tested in test_compile.py)."""

from __future__ import annotations

import pytest
import torch

from benchmark_modules import load_benchmark
from quant_helpers import needs_int_kernel


def _module():
    return load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def cpu_rows():
    mod = _module()
    return mod, mod.run_checks(torch.device("cpu"), "DiT-S/8", quick=True, compile_backend="aot_eager")


@needs_int_kernel
def test_gpu_check_on_cpu(cpu_rows, capsys):
    mod, rows = cpu_rows
    assert len(rows) == 10
    assert rows[0]["max_diff"] == 0 and rows[1]["max_diff"] == 0 and rows[2]["max_diff"] == 0  # CPU vs CPU
    # int_mm vs simulated: float rounding and the code flips it causes, as a 1e-6 input noise does
    assert 0 < rows[3]["floor"] < 1e-2 and 0 < rows[3]["rel_diff"] <= 2 * rows[3]["floor"] and rows[3]["ok"]
    assert rows[4]["max_diff"] == 0 and rows[4]["ok"]  # save + load is bit-exact
    mod.print_table(rows, torch.device("cpu"))
    out = capsys.readouterr().out
    assert out.count("\n| ") == 10 and "| ok |" in out


def test_bf16_pipeline_quantized_sampled_saved_and_compiled(cpu_rows):
    _, rows = cpu_rows
    bf16, save_load, _, compiled = rows[5:9]
    assert bf16["check"].startswith("bf16 PixArt") and bf16["ok"] and 20 < bf16["psnr"] < 120
    assert save_load["ok"] and save_load["max_diff"] == 0
    assert compiled["ok"] and 0 < compiled["floor"] < 0.1 and compiled["rel_diff"] <= 2 * compiled["floor"]
    assert all(r["device_s"] > 0 and r["cpu_s"] != r["cpu_s"] for r in rows[5:])  # CPU only: no second column


@needs_int_kernel
def test_w4a4_row_int_kernel_within_the_noise_floor(cpu_rows):
    _, rows = cpu_rows
    w4a4 = rows[9]
    assert w4a4["check"].startswith("W4A4") and 0 < w4a4["floor"] < 0.1  # 4-bit codes: a 1e-6 change flips more
    assert 0 < w4a4["rel_diff"] <= 2 * w4a4["floor"] and w4a4["ok"]


def test_lora_row_on_pixart(cpu_rows):
    _, rows = cpu_rows
    lora = rows[7]
    assert lora["check"].startswith("peft LoRA") and lora["psnr_base"] > 20
    assert lora["ok"], lora["note"]


def test_skip_leaves_checks_out_and_an_unknown_name_is_a_usage_error(capsys):
    mod = _module()
    assert mod.main(["--device", "cpu", "--skip", ",".join(mod.CHECKS)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| check |") and out.count("\n| ") == 0  # the header, no rows
    with pytest.raises(SystemExit) as exc:
        mod.main(["--device", "cpu", "--skip", "sample,nope"])
    assert exc.value.code == 2 and "unknown check nope" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_on_cuda():
    # the LoRA row fails on every device until the known gap above is closed (test_lora_row_on_pixart)
    assert _module().main(["--device", "cuda", "--quick"]) == 0
