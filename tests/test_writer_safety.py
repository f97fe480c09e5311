"""The one writer (``ditas.fileio``) against a hostile or careless neighbour: links planted at the
predictable names of partial and lock entries are never followed, published nor deleted; an output
equal to an input is refused; ``--overwrite`` checks every entry by kind before any work; two
writers of one npz never share it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import ditas
from ditas.cli.main import main
from ditas.errors import DitasError
from ditas.fileio import MARKER_KEY, atomic_file, publish_dir
from quant_helpers import random_dit

QUICK = ["--recipe", "rtn", "--calib-labels", "1", "--calib-steps", "2", "--no-progress"]
TRAIN = ["--batch-size", "4", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "8",
         "--no-progress"]
BENCH = ["benchmark", "--recipes", "fp", "--num", "4", "--steps", "2", "--batch-size", "4", "--no-progress",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    ditas.save_dit(random_dit(5, depth=1), path)
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _samples(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), labels=np.arange(20) % 10)
    return path.read_bytes()


def _write(folder: Path) -> None:
    (folder / "report.json").write_text('{"tag": "a"}')


# ----------------------------------------------------------------------------------------------
#                                 Planted links (predictable names)
# ----------------------------------------------------------------------------------------------


def test_a_dangling_link_at_the_partial_name_is_not_followed(tmp_path):
    out, victim = tmp_path / "x.json", tmp_path / "victim"
    link = tmp_path / f".x.json.ditas-partial-{os.getpid()}.json"
    link.symlink_to(victim)
    with atomic_file(out) as tmp:
        tmp.write_text("data")
    assert not victim.exists() and not victim.is_symlink()  # nothing written through the link
    assert out.is_file() and not out.is_symlink() and out.read_text() == "data"
    assert link.is_symlink() and os.readlink(link) == str(victim)  # not ours: left alone


def test_a_link_to_a_user_file_at_the_partial_name_changes_nothing(tmp_path):
    victim = tmp_path / "mine.txt"
    victim.write_text("keep me")
    link = tmp_path / ".x.json.ditas-partial-12345.json"  # another PID's name: what clean-up looks at
    link.symlink_to(victim)
    with atomic_file(tmp_path / "x.json") as tmp:
        tmp.write_text("data")
    assert victim.read_text() == "keep me" and link.is_symlink()
    assert not (tmp_path / "x.json").is_symlink()


def test_a_planted_lock_link_is_refused_and_not_followed(tmp_path):
    out, victim = tmp_path / "x.json", tmp_path / "victim"
    lock = tmp_path / ".x.json.ditas-lock"
    lock.symlink_to(victim)
    with pytest.raises(DitasError, match="symbolic link") as err:
        with atomic_file(out) as tmp:
            tmp.write_text("data")
    assert "\n" not in str(err.value)
    assert not victim.exists() and not out.exists() and lock.is_symlink()


def test_a_planted_lock_link_makes_the_cli_fail_with_one_line(tmp_path, model_dir, capsys):
    victim = tmp_path / "victim"
    (tmp_path / ".q.ditas-lock").symlink_to(victim)
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--out", str(tmp_path / "q")]) == 2
    assert "lock file" in _one_line_error(capsys)
    assert not victim.exists() and not (tmp_path / "q").exists()


def test_a_planted_partial_folder_link_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("keep me")
    link = tmp_path / f".o.ditas-partial-{os.getpid()}"
    link.symlink_to(elsewhere, target_is_directory=True)
    other = tmp_path / ".o.ditas-partial-12345"  # a killed run's name, as clean-up sees it
    other.symlink_to(elsewhere, target_is_directory=True)
    out = publish_dir(tmp_path / "o", "test", _write)
    assert out.is_dir() and not out.is_symlink() and json.loads((out / "report.json").read_text()) == {"tag": "a"}
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mine.txt"]
    assert link.is_symlink() and other.is_symlink()


def test_a_planted_old_link_is_never_restored_as_the_output(tmp_path):
    """Recovery restores a parked ``.NAME.ditas-old-*`` folder when NAME is missing; a link planted
    there (to a folder with a marker) must not become the output."""
    real = publish_dir(tmp_path / "theirs", "test", _write)
    link = tmp_path / ".o.ditas-old-12345"
    link.symlink_to(real, target_is_directory=True)
    out = publish_dir(tmp_path / "o", "test", _write)
    assert not out.is_symlink() and out.is_dir() and link.is_symlink() and (real / "report.json").exists()


# ----------------------------------------------------------------------------------------------
#                                      Outputs onto inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("onto", ["samples", "ref", "hardlink"])
def test_eval_json_onto_an_input_is_refused(tmp_path, capsys, onto):
    samples, ref = tmp_path / "s8.npz", tmp_path / "ref.npz"
    kept = _samples(samples)
    ref.write_bytes(kept)
    argv = ["eval", str(samples), "--overwrite", "--json"]
    if onto == "samples":
        argv += [str(samples)]
    elif onto == "ref":
        argv += [str(ref), "--ref", str(ref)]
    else:
        os.link(samples, tmp_path / "same.npz")
        argv += [str(tmp_path / "same.npz")]
    assert main(argv) == 2
    assert "would replace the input" in _one_line_error(capsys)
    assert samples.read_bytes() == kept and ref.read_bytes() == kept


def test_eval_ref_cache_onto_the_samples_is_refused(tmp_path, capsys):
    samples = tmp_path / "s.npz"
    kept = _samples(samples)
    assert main(["eval", str(samples), "--ref", str(samples), "--ref-cache", str(samples)]) == 2
    assert "--ref-cache" in _one_line_error(capsys)
    assert samples.read_bytes() == kept


def test_eval_empty_json_path_is_an_error(tmp_path, capsys):
    samples = tmp_path / "s.npz"
    _samples(samples)
    assert main(["eval", str(samples), "--json", ""]) == 2
    assert "empty path" in _one_line_error(capsys)


def test_train_out_equal_to_its_init_is_refused(tmp_path, capsys):
    out = tmp_path / "run1"
    assert main(["train", "--out", str(out), "--steps", "1", *TRAIN]) == 0
    before = (out / "ema" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--init", str(out), "--overwrite", "--steps", "1", *TRAIN]) == 2
    assert "would replace the input" in _one_line_error(capsys)
    assert (out / "ema" / "model.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------------------------
#                              --overwrite checks every entry by kind
# ----------------------------------------------------------------------------------------------


def test_quantize_overwrite_refuses_a_folder_where_ditas_wrote_a_file(tmp_path, model_dir, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(model_dir), *QUICK, "--out", str(out)]
    assert main(argv) == 0
    assert "report.json" in json.loads((out / "config.json").read_text())[MARKER_KEY]["files"]
    (out / "report.json").unlink()
    (out / "report.json").mkdir()
    (out / "report.json" / "mine.txt").write_text("keep me")
    capsys.readouterr()
    assert main(argv + ["--overwrite"]) == 2
    assert "report.json/" in _one_line_error(capsys)
    assert (out / "report.json" / "mine.txt").read_text() == "keep me"


def test_a_user_file_in_a_ditas_sub_folder_is_refused(tmp_path):
    def write(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"w")

    out = publish_dir(tmp_path / "o", "test", write)
    assert json.loads((out / "config.json").read_text())[MARKER_KEY]["dirs"] == {"sub": {"files": ["weights.bin"],
                                                                                         "dirs": {}}}
    publish_dir(out, "test", write, overwrite=True)  # what ditas wrote is replaced
    (out / "sub" / "mine.txt").write_text("keep me")
    with pytest.raises(DitasError, match="sub/mine.txt"):
        publish_dir(out, "test", write, overwrite=True)
    assert (out / "sub" / "mine.txt").read_text() == "keep me"


def test_an_old_marker_without_folders_still_works_for_plain_folders(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "config.json").write_text(json.dumps({MARKER_KEY: {"kind": "test", "files": ["config.json",
                                                                                       "report.json"]}}))
    publish_dir(out, "test", _write, overwrite=True)
    assert json.loads((out / "report.json").read_text()) == {"tag": "a"}
    (out / "report.json").unlink()
    (out / "report.json").mkdir()  # an old marker cannot say "folder": refused
    with pytest.raises(DitasError, match="did not write"):
        publish_dir(out, "test", _write, overwrite=True)


def test_benchmark_overwrite_keeps_user_files_in_its_sub_folders(tmp_path, capsys, monkeypatch):
    from ditas.evaluation import benchmark

    out = tmp_path / "b6"
    assert main([*BENCH, "--out", str(out)]) == 0
    mine = out / "samples" / "mine.txt"
    mine.write_text("keep me")
    capsys.readouterr()

    def no_work(*a, **k):
        raise AssertionError("the benchmark worked before refusing")

    monkeypatch.setattr(benchmark, "_benchmark", no_work)
    assert main([*BENCH, "--overwrite", "--out", str(out)]) == 2
    assert "samples/mine.txt" in _one_line_error(capsys)
    assert mine.read_text() == "keep me"
    mine.unlink()
    results = out / "results.json"
    results.unlink()
    results.mkdir()
    (results / "mine.txt").write_text("keep me")
    assert main([*BENCH, "--overwrite", "--out", str(out)]) == 2
    assert "results.json/" in _one_line_error(capsys)
    assert (results / "mine.txt").read_text() == "keep me"
    (results / "mine.txt").unlink()
    results.rmdir()
    monkeypatch.undo()
    assert main([*BENCH, "--overwrite", "--out", str(out)]) == 0  # its own files only: replaced


def test_train_overwrite_refuses_a_user_file_in_ema_before_training(tmp_path, capsys, monkeypatch):
    import ditas.training as training

    out = tmp_path / "run1"
    assert main(["train", "--out", str(out), "--steps", "1", *TRAIN]) == 0
    (out / "ema" / "x").write_text("keep me")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    monkeypatch.setattr(training, "_train", lambda *a, **k: pytest.fail("training started before the refusal"))
    t0 = time.perf_counter()
    assert main(["train", "--out", str(out), "--overwrite", "--steps", "500", *TRAIN]) == 2
    assert time.perf_counter() - t0 < 30
    assert "ema/x" in _one_line_error(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------------
#                                     Two writers of one npz
# ----------------------------------------------------------------------------------------------


def test_a_second_sample_to_the_same_npz_fails_at_once(tmp_path, model_dir, capsys):
    out, ready, go = tmp_path / "x.npz", tmp_path / "ready", tmp_path / "go"
    argv = ["sample", "--model", str(model_dir), "--num", "4", "--steps", "2", "--batch-size", "2",
            "--no-progress", "--out", str(out)]
    src = str(Path(ditas.__file__).resolve().parents[1])
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        import ditas.diffusion.batches as batches
        from ditas.cli.main import main
        ready, go = Path(sys.argv[1]), Path(sys.argv[2])
        real = batches.sample_batch
        def slow(*a, **k):
            ready.touch()
            while not go.exists():
                time.sleep(0.02)
            return real(*a, **k)
        batches.sample_batch = slow
        sys.exit(main(sys.argv[3:]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(Path(__file__).parent)]), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", code, str(ready), str(go), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import threading

    release = threading.Timer(60, go.touch)  # bounds the test if the second run waits instead of failing
    release.start()
    try:
        end = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < end, "the first writer never started sampling"
            time.sleep(0.05)
        assert main(argv) == 2
        assert "another ditas run is writing" in _one_line_error(capsys)
    finally:
        release.cancel()
        go.touch()
        rc = first.wait(120)
    assert rc == 0, first.communicate()
    with np.load(out) as data:
        assert data["arr_0"].shape[0] == 4 and list(data["labels"].shape) == [4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "ready", "x.npz"]
