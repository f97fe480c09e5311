"""``--device`` / ``device=``: resolution, one-line errors, and (with CUDA) the same samples as on CPU."""

from __future__ import annotations

import pytest
import torch

import ditas
from ditas.cli.main import main
from ditas.devices import resolve_device
from ditas.errors import DitasError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cpu:0:1", ""):
        with pytest.raises(DitasError, match="--device"):
            resolve_device(bad)
    with pytest.raises(DitasError, match="no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(DitasError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_load_dit_on_a_missing_device_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DitasError, match="no CUDA device"):
        ditas.load_dit(device="cuda")
    m = ditas.load_dit(device="cpu")
    assert {p.device.type for p in m.parameters()} == {"cpu"}


@pytest.mark.parametrize("command", [["quantize"], ["compare", "--num", "2"]])
def test_cli_missing_cuda_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main([*command, "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.cuda
@cuda
def test_cuda_samples_match_cpu():
    from ditas.diffusion.batches import generate

    labels = torch.arange(8)
    cpu = generate(ditas.load_dit(device="cpu"), labels, steps=5, seed=1, progress=False)
    gpu = generate(ditas.load_dit(device="cuda"), labels, steps=5, seed=1, progress=False)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 1e-3  # same noise (drawn on the CPU); float rounding only
