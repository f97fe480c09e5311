"""``benchmarks/gpu_check.py`` runs here on the CPU (and, marked ``cuda``, on a GPU where there is one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from quant_helpers import needs_int_kernel

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_int_kernel
def test_gpu_check_on_cpu(capsys):
    mod = _module()
    rows = mod.run_checks(torch.device("cpu"), "DiT-S/8", quick=True)
    assert len(rows) == 5
    assert rows[0]["max_diff"] == 0 and rows[1]["max_diff"] == 0 and rows[2]["max_diff"] == 0  # CPU vs CPU
    # int_mm vs simulated: float rounding and the code flips it causes, as a 1e-6 input noise does
    assert 0 < rows[3]["floor"] < 1e-2 and 0 < rows[3]["rel_diff"] <= 2 * rows[3]["floor"]
    assert rows[4]["max_diff"] == 0  # save + load is bit-exact
    mod.print_table(rows, torch.device("cpu"))
    assert capsys.readouterr().out.count("\n| ") == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_on_cuda():
    assert _module().main(["--device", "cuda", "--quick"]) == 0
