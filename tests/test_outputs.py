"""Outputs never destroy what the user owns: refusal of existing folders, --overwrite of ditas's own
outputs only, the input model, one atomic publication, locks, and runs killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ditas
from ditas.cli.main import main
from ditas.errors import DitasError
from ditas.fileio import MARKER_KEY, json_text, output_dir, publish_dir, read_marker
from quant_helpers import random_dit

QUICK = ["--recipe", "rtn", "--calib-labels", "1", "--calib-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    ditas.save_dit(random_dit(5, depth=1), path)
    return path


def _user_folder(path: Path) -> dict[str, str]:
    (path / "sub").mkdir(parents=True)
    files = {"notes.txt": "my notes", "sub/data.csv": "a,b\n1,2\n"}
    for name, text in files.items():
        (path / name).write_text(text)
    return files


def _assert_intact(path: Path, files: dict[str, str]) -> None:
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == sorted(files)
    for name, text in files.items():
        assert (path / name).read_text() == text


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------------------------
#                                   Existing folders and the input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["quantize", "compare"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_user_files_survives(tmp_path, model_dir, capsys, command, overwrite):
    out = tmp_path / "v"
    files = _user_folder(out)
    argv = [command, "--model", str(model_dir), *QUICK, "--out", str(out)] + (["--overwrite"] if overwrite else [])
    if command == "compare":
        argv = [command, "--model", str(model_dir), "--recipes", "fp,rtn", "--num", "2", "--steps", "2",
                "--calib-steps", "2", "--no-progress", "--out", str(out)] + (["--overwrite"] if overwrite else [])
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert ("not a folder ditas wrote" if overwrite else "exists already") in err
    _assert_intact(out, files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no lock, no temp folder left


@pytest.mark.parametrize("target", ["folder", "weights"])
def test_the_input_model_is_never_replaced(tmp_path, model_dir, capsys, target):
    import shutil

    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    before = _tree(m)
    assert read_marker(m) is not None  # a folder ditas wrote: only the input rule protects it
    model = m if target == "folder" else m / "model.safetensors"
    assert main(["quantize", "--model", str(model), *QUICK, "--out", str(m), "--overwrite"]) == 2
    assert "would replace the input" in _one_line_error(capsys)
    assert _tree(m) == before


def test_overwrite_replaces_only_a_ditas_output_and_refuses_an_edited_one(tmp_path, model_dir, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--out", str(out)]) == 0
    first = _tree(out)
    assert set(read_marker(out)["files"]) == {"config.json", "model.safetensors", "report.json"}
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--out", str(out)]) == 2
    assert "exists already" in _one_line_error(capsys)
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--calib-seed", "1", "--out", str(out),
                 "--overwrite"]) == 0
    second = _tree(out)
    assert second.keys() == first.keys() and second["report.json"] != first["report.json"]
    assert json.loads(second["config.json"])["quantization"]["config"]["calibration"]["seed"] == 1
    (out / "notes.txt").write_text("mine")  # the user adds a file to the output: it is theirs now
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--out", str(out), "--overwrite"]) == 2
    assert "did not write (notes.txt)" in _one_line_error(capsys)
    assert _tree(out) == {**second, "notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.parametrize("out", [".", "", "..", "/proc/q"])
def test_unwritable_out_is_refused_before_the_work(out, model_dir, capsys, monkeypatch):
    if out == "/proc/q" and not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    import ditas.quantization.apply as apply

    def no_work(*a, **k):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr(apply, "quantize", no_work)
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--out", out]) == 2
    _one_line_error(capsys)


def test_a_file_at_out_is_refused(tmp_path, model_dir, capsys):
    out = tmp_path / "f"
    out.write_text("keep")
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--out", str(out), "--overwrite"]) == 2
    assert "not a folder ditas wrote" in _one_line_error(capsys)
    assert out.read_text() == "keep"


def test_train_refuses_a_folder_with_user_files(tmp_path, capsys):
    out = tmp_path / "run"
    files = _user_folder(out)
    assert main(["train", "--out", str(out), "--steps", "1", "--no-progress", "--overwrite"]) == 2
    assert "did not write" in _one_line_error(capsys)
    _assert_intact(out, files)


# ----------------------------------------------------------------------------------------------
#                                    The publication contract
# ----------------------------------------------------------------------------------------------


def _write(tag: str):
    def write(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps({"tag": tag}))
        (folder / "report.json").write_text(json.dumps({"tag": tag}))
    return write


def test_publish_adds_the_marker_and_leaves_nothing_else(tmp_path):
    out = publish_dir(tmp_path / "o", "test", _write("a"))
    data = json.loads((out / "config.json").read_text())
    assert data["tag"] == "a" and data[MARKER_KEY] == {"kind": "test", "files": ["config.json", "report.json"], "dirs": {}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_failed_write_leaves_the_previous_output(tmp_path):
    out = publish_dir(tmp_path / "o", "test", _write("a"))
    before = _tree(out)

    def fail(folder: Path) -> None:
        _write("b")(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_dir(out, "test", fail, overwrite=True)
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_replacement_without_atomic_exchange_is_recovered(tmp_path, monkeypatch):
    """Where the system cannot swap two folders, a replacement is two renames; a run killed between
    them leaves the previous output under .NAME.ditas-old-PID, which the next run restores."""
    import ditas.fileio as fileio

    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    out = publish_dir(tmp_path / "o", "test", _write("a"))
    publish_dir(out, "test", _write("b"), overwrite=True)  # the fallback path works
    assert json.loads((out / "report.json").read_text()) == {"tag": "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    before = _tree(out)
    os.replace(out, tmp_path / ".o.ditas-old-12345")  # the state a kill between the renames leaves
    (tmp_path / ".o.ditas-partial-12345").mkdir()
    with pytest.raises(DitasError, match="exists already"):
        with output_dir(out, "test"):
            pass
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_json_text_refuses_non_finite_numbers():
    assert json.loads(json_text({"a": [1.0, 2]})) == {"a": [1.0, 2]}
    with pytest.raises(DitasError, match=r"x\.1\.y is not a finite number"):
        json_text({"x": [0.0, {"y": float("nan")}]})
    with pytest.raises(DitasError, match="not a finite"):
        json_text({"x": float("-inf")})


# ----------------------------------------------------------------------------------------------
#                              Concurrent writers and killed writers
# ----------------------------------------------------------------------------------------------

_SRC = str(Path(ditas.__file__).resolve().parents[1])
_TESTS = str(Path(__file__).resolve().parent)


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_SRC, _TESTS]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended early: {proc.communicate()}")
        assert time.monotonic() < end, "the writer never got there"
        time.sleep(0.02)


def test_a_second_writer_is_refused_while_the_first_holds_the_path(tmp_path):
    out, ready, go = tmp_path / "o", tmp_path / "ready", tmp_path / "go"
    holder = _python("""
        import json, sys, time
        from pathlib import Path
        from ditas.fileio import output_dir
        out, ready, go = map(Path, sys.argv[1:])
        with output_dir(out, "test") as claim:
            (claim.tmp / "report.json").write_text(json.dumps({"tag": "first"}))
            ready.touch()
            while not go.exists():
                time.sleep(0.02)
            claim.publish()
    """, str(out), str(ready), str(go))
    _wait_for(ready, holder)
    with pytest.raises(DitasError, match="another ditas run is writing"):
        publish_dir(out, "test", _write("second"), overwrite=True)
    go.touch()
    assert holder.wait(60) == 0, holder.communicate()
    assert json.loads((out / "report.json").read_text()) == {"tag": "first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "o", "ready"]


def test_concurrent_writers_never_mix_their_outputs(tmp_path):
    """Several processes replace one output over and over; every published folder is one writer's
    whole output (config and report agree), and nothing is left beside it."""
    out = tmp_path / "o"
    code = """
        import json, sys, time
        from pathlib import Path
        from ditas.errors import DitasError
        from ditas.fileio import publish_dir
        out, tag = Path(sys.argv[1]), sys.argv[2]
        def write(folder):
            (folder / "config.json").write_text(json.dumps({"tag": tag}))
            time.sleep(0.01)
            (folder / "report.json").write_text(json.dumps({"tag": tag, "pad": "x" * 100000}))
        done = 0
        while done < 3:
            try:
                publish_dir(out, "test", write, overwrite=True)
                done += 1
            except DitasError as exc:
                assert "another ditas run" in str(exc), exc
                time.sleep(0.005)
    """
    procs = [_python(code, str(out), f"w{i}") for i in range(3)]
    seen = set()

    def read(dfd: int, name: str) -> dict:
        fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
        with os.fdopen(fd) as f:
            return json.loads(f.read())

    while any(p.poll() is None for p in procs):
        try:  # both files from one folder (a directory fd), even if a replacement happens meanwhile
            dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            cfg, rep = read(dfd, "config.json"), read(dfd, "report.json")
        except FileNotFoundError:  # the folder was replaced and is being removed
            continue
        finally:
            os.close(dfd)
        assert cfg["tag"] == rep["tag"], (cfg["tag"], rep["tag"])
        seen.add(cfg["tag"])
    for p in procs:
        assert p.wait() == 0, p.communicate()
    assert json.loads((out / "config.json").read_text())["tag"] == json.loads((out / "report.json").read_text())["tag"]
    assert seen and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_quantize_killed_during_the_save_loses_nothing(tmp_path, model_dir):
    """A real ``ditas quantize`` killed with SIGKILL while writing its weights: the previous output
    is untouched, the leftover is a folder named as partial, and the next run removes it."""
    out, ready = tmp_path / "q", tmp_path / "ready"
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--out", str(out)]) == 0
    before = _tree(out)
    proc = _python("""
        import sys, time
        from pathlib import Path
        import safetensors.torch
        from ditas.cli.main import main
        ready = Path(sys.argv[1])
        def slow_save(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a file")
            ready.touch()
            time.sleep(600)
        safetensors.torch.save_file = slow_save
        sys.exit(main(sys.argv[2:]))
    """, str(ready), "quantize", "--model", str(model_dir), *QUICK, "--calib-seed", "3", "--out", str(out),
        "--overwrite")
    _wait_for(ready, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert _tree(out) == before
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("q", "ready"))
    assert left == [".q.ditas-lock", f".q.ditas-partial-{proc.pid}"]
    assert main(["quantize", "--model", str(model_dir), *QUICK, "--calib-seed", "3", "--out", str(out),
                 "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["config"]["calibration"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "ready"]
    ditas.load_dit(out, kernel="simulated")


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_an_existing_output_file_is_replaced_only_with_overwrite(tmp_path, model_dir, capsys, command):
    import numpy as np

    out = tmp_path / ("x.png" if command == "sample" else "m.json")
    out.write_text("my file")
    if command == "sample":
        argv = ["sample", "--model", str(model_dir), "--num", "1", "--steps", "2", "--out", str(out)]
    else:
        npz = tmp_path / "s.npz"
        rng = np.random.default_rng(0)
        np.savez(npz, arr_0=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), labels=np.arange(20) % 10)
        argv = ["eval", str(npz), "--out", str(out)]
    assert main(argv) == 2
    assert "exists already" in _one_line_error(capsys)
    assert out.read_text() == "my file"
    assert main(argv + ["--overwrite"]) == 0
    assert out.read_bytes() != b"my file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.npz", out.name] if command == "eval" else [out.name])


def test_train_continues_over_what_a_killed_run_left(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--steps", "1", "--batch-size", "4", "--hidden-size", "32", "--depth", "1",
            "--num-heads", "2", "--patch-size", "8", "--no-progress"]
    assert main(argv) == 0
    (out / ".ema.ditas-partial-99999").mkdir()  # what a run killed while saving ema/ leaves
    (out / ".train_log.jsonl.ditas-lock").write_text("")
    assert main(argv) == 2
    assert "earlier training run; give --overwrite" in _one_line_error(capsys)
    capsys.readouterr()
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ema", "raw", "summary.json", "train_log.jsonl"]
