"""Sharded, resumable, multi-process npz sampling (``diffusion.sharded`` and ``ditas sample``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ditas
from ditas.cli.main import main
from ditas.diffusion import batches, sharded
from ditas.diffusion.run import SamplingSettings
from ditas.errors import DitasError

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMON = ["--classes", "0,1,2,3,4,5,6,7,8,9", "--num-samples", "23", "--steps", "3", "--seed", "4"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _sample(out: Path, *extra: str) -> bytes:
    assert main(["sample", *COMMON, *extra, "--out", str(out)]) == 0
    return out.read_bytes()


def test_npz_is_byte_identical_for_batch_and_shard_sizes(tmp_path):
    ref = _sample(tmp_path / "a.npz", "--batch-size", "64")
    assert _sample(tmp_path / "b.npz", "--batch-size", "1") == ref
    assert _sample(tmp_path / "c.npz", "--batch-size", "7", "--shard-size", "5") == ref
    data = np.load(tmp_path / "a.npz")
    assert data["arr_0"].shape == (23, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [i % 10 for i in range(23)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "c.npz"]  # shard folders removed


def test_npz_matches_generate(tmp_path):
    from ditas.diffusion.batches import generate
    from ditas.diffusion.images import decode_to_uint8

    m = ditas.load_dit()
    labels = torch.arange(5)
    sharded.sample_npz(m, labels, tmp_path / "x.npz", SamplingSettings(steps=3, seed=1), batch_size=2,
                       shard_size=3, progress=False)
    images = decode_to_uint8(m, generate(m, labels, steps=3, seed=1, progress=False))
    assert np.array_equal(np.load(tmp_path / "x.npz")["arr_0"], images)


def test_killed_run_resumes_and_redoes_only_missing_shards(tmp_path, monkeypatch):
    m = ditas.load_dit()
    labels = torch.arange(12) % 10
    s = SamplingSettings(steps=2, seed=3)
    sharded.sample_npz(m, labels, tmp_path / "ref.npz", s, batch_size=2, shard_size=4, progress=False)

    calls = []
    real = batches.sample_batch  # the one batch loop (diffusion/batches.py)

    def dying(model, y, settings, indices, *a, **k):
        calls.append(list(indices))
        if len(calls) == 5:  # in the third shard
            raise KeyboardInterrupt
        return real(model, y, settings, indices, *a, **k)

    monkeypatch.setattr(batches, "sample_batch", dying)
    out = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        sharded.sample_npz(m, labels, out, s, batch_size=2, shard_size=4, progress=False)
    shards = tmp_path / "run.npz.shards"
    assert not out.exists()
    assert sorted(p.name for p in shards.iterdir()) == [
        "images-00000000-00000004.npy", "images-00000000-00000004.sha256",
        "images-00000004-00000008.npy", "images-00000004-00000008.sha256", "run.json"]
    (shards / ".images-00000008-00000012.npy.ditas-partial-99999999.npy").write_bytes(b"partial")  # as a SIGKILL leaves it
    calls.clear()
    monkeypatch.setattr(batches, "sample_batch", lambda *a, **k: (calls.append(list(a[3])), real(*a, **k))[1])
    sharded.sample_npz(m, labels, out, s, batch_size=2, shard_size=4, progress=False)
    assert calls == [[8, 9], [10, 11]]  # only the missing shard
    assert out.read_bytes() == (tmp_path / "ref.npz").read_bytes()
    assert not shards.exists()


def test_resume_with_other_arguments_is_refused(tmp_path, monkeypatch):
    m = ditas.load_dit()
    out = tmp_path / "run.npz"
    monkeypatch.setattr(sharded, "write_npz_stream", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        sharded.sample_npz(m, [1, 2, 3], out, SamplingSettings(steps=2, seed=0), shard_size=2, progress=False)
    with pytest.raises(DitasError, match="different run .*settings"):
        sharded.sample_npz(m, [1, 2, 3], out, SamplingSettings(steps=2, seed=1), shard_size=2, progress=False)
    with pytest.raises(DitasError, match="different run .*labels"):
        sharded.sample_npz(m, [1, 2, 4], out, SamplingSettings(steps=2, seed=0), shard_size=2, progress=False)


def test_torchrun_two_processes_is_byte_identical(tmp_path):
    pytest.importorskip("torch.distributed.run")
    ref = _sample(tmp_path / "one.npz", "--batch-size", "4")
    out = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ditas", "sample", *COMMON, "--batch-size", "3", "--shard-size", "4", "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes() == ref
    assert "wrote 23 images" in proc.stdout and proc.stdout.count("wrote") == 1  # rank 0 only


@contextlib.contextmanager
def _threads(n: int):
    """This process computes with ``n`` threads inside the block (torchrun's processes get 1 each,
    ``OMP_NUM_THREADS=1`` in ``_env``): another thread count rounds some float sums differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        assert torch.get_num_threads() == n
        yield
    finally:
        torch.set_num_threads(before)


_ONLY_PROCESS_0_QUANTIZES = """
import os, sys
import ditas.quantization.apply as apply
from ditas.cli.main import main

def refuse(*a, **k):
    raise AssertionError("process " + os.environ["RANK"] + " quantized or calibrated: only process 0 may")

if os.environ["RANK"] != "0":
    apply.quantize = apply.record = refuse
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m ditas ARGS`` on the CPU, one thread per process; must succeed.
    The processes other than 0 fail if they quantize or record a calibration run: whatever their
    rounding, they must use process 0's model (on this CPU another thread count happens to round
    the same, so equal results alone would not show it)."""
    pytest.importorskip("torch.distributed.run")
    script = tmp_path / "ditas_only_process_0_quantizes.py"
    script.write_text(_ONLY_PROCESS_0_QUANTIZES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_rows_match(one: dict, two: dict) -> None:
    """The same fields; integers and strings equal, floats to the rounding of another thread count
    (process 0 scores with 1 thread, the one-process run with 2). FIDs get 1e-4: the matrix square
    root of a 7-sample covariance (rank deficient) magnifies rounding about 1000 times (measured:
    3e-5 between 1 and 2 threads on the same images); every other float 1e-6 (the eps MSE of models
    quantized by each process differed by 2e-3)."""
    for name in one:
        assert set(two[name]) == set(one[name]), name
        for field, value in one[name].items():
            if isinstance(value, float):
                rel = 1e-4 if field.startswith(("fid", "sfid")) else 1e-6
                assert two[name][field] == pytest.approx(value, rel=rel, abs=1e-9), (name, field)
            else:
                assert two[name][field] == value, (name, field)


def test_compare_under_torchrun_equals_one_process(tmp_path):
    """``ditas compare`` under torchrun (1 thread per process) against one process with 2 threads:
    process 0 quantizes each recipe and sends it to the other, so the images are byte-equal and the
    metrics equal to float rounding. The batch size is the same in both runs: the quantized models'
    per-tensor activation scale is shared by the samples of a batch."""
    args = ["compare", "--recipes", "fp,rtn,ditas", "--num-samples", "7", "--steps", "2", "--cfg-scale", "1.5",
            "--calib-steps", "2", "--calib-labels", "2", "--lora-rank", "2", "--lora-rounds", "1",
            "--eps-samples", "2", "--domain", "on", "--device", "cpu", "--no-progress", "--batch-size", "2"]
    with _threads(2):
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = _torchrun(tmp_path, *args, "--out", str(tmp_path / "two"))
    assert proc.stdout.count("wrote ") == 1  # process 0 only
    timing = {"sample_time_s", "quantize_time_s"}

    def rows(folder):
        data = json.loads((folder / "compare.json").read_text())
        return {k: {f: v for f, v in r.items() if f not in timing} for k, r in data["recipes"].items()}

    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert list(two) == ["fp", "rtn@w4a8", "ditas@w4a8"]
    _assert_rows_match(one, two)
    assert two["ditas@w4a8"]["psnr_db"] is not None and two["rtn@w4a8"]["fid"] is not None
    assert (tmp_path / "two" / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()


def test_benchmark_under_torchrun_equals_one_process(tmp_path):
    """``ditas benchmark`` under torchrun (1 thread per process) against one process with 2 threads:
    one quantized model (process 0's) samples every shard, so each row's npz is byte-equal."""
    args = ["benchmark", "--recipes", "rtn", "--num-samples", "7", "--steps", "2", "--calib-steps", "2",
            "--calib-labels", "2", "--lora-rank", "2", "--lora-rounds", "1", "--batch-size", "2",
            "--device", "cpu", "--no-progress"]
    with _threads(2):
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = _torchrun(tmp_path, *args, "--out", str(tmp_path / "two"))
    assert proc.stdout.count("wrote ") == 1  # process 0 only
    results = {k: json.loads((tmp_path / k / "results.json").read_text())["rows"] for k in ("one", "two")}
    assert [r["recipe"] for r in results["two"]] == ["rtn@w4a8"]
    _assert_rows_match({r["recipe"]: r for r in results["one"]}, {r["recipe"]: r for r in results["two"]})
    name = "samples/rtn_w4a8_s2.npz"
    assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_missing_cuda_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sample", "--device", "cuda", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]
    assert main(["sample", "--device", "tpu", "--out", str(tmp_path / "x.npz")]) == 2
    assert "--device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_peak_memory_does_not_grow_with_num(tmp_path):
    """Peak RSS of ``ditas sample --num 2000`` within 1.5x of ``--num 200`` (128x128 RGB images:
    2000 of them would hold 98 MB as uint8 and 393 MB as float samples if kept in memory)."""
    torch.manual_seed(0)
    model = ditas.DiT(ditas.DiTConfig(input_size=128, patch_size=16, in_channels=3, hidden_size=32, depth=1,
                                      num_heads=2, num_classes=10)).eval()
    ditas.save_dit(model, tmp_path / "m")
    code = ("import resource, sys; from ditas.cli.main import main; "
            "rc = main(sys.argv[1:]); print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
            "sys.exit(rc)")
    peaks = {}
    for num in (200, 2000):
        proc = subprocess.run([sys.executable, "-c", code, "sample", "--model", str(tmp_path / "m"), "--space",
                               "pixel", "--num", str(num), "--steps", "2", "--cfg-scale", "1", "--batch-size", "50",
                               "--device", "cpu", "--out", str(tmp_path / f"{num}.npz")],
                              capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[num] = int(proc.stdout.split("RSS")[-1].split()[0])
        (tmp_path / f"{num}.npz").unlink()
    assert peaks[2000] <= 1.5 * peaks[200], peaks
