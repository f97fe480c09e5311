"""Issue 19, early checks and API errors: every bad argument is a one-line error (exit 2) raised
before the long work (calibration, sampling, loading a pipeline), and nothing is written.

The long-work functions are replaced by ones that fail the test if called, so a check that came
too late shows up as that failure rather than as a slow pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import ditas
from ditas.cli.main import main
from ditas.errors import ConfigError, DitasError
from quant_helpers import random_dit

pytest.importorskip("transformers")
import family_models as fm  # noqa: E402

QUANT = ["--calib-steps", "2", "--calib-prompts", "2", "--calib-batch", "2", "--lora-rank", "2",
         "--lora-rounds", "1", "--no-progress"]


def _never(name: str):
    def fail(*_a, **_k):
        raise AssertionError(f"{name} ran: the check came after the long work started")
    return fail


@pytest.fixture
def no_long_work(monkeypatch):
    """Every long-work entry point of the commands fails the test if reached."""
    import ditas.diffusion.batches as batches
    import ditas.evaluation.benchmark as bench
    import ditas.diffusion.sharded as sharded
    import ditas.evaluation.comparison as comparison
    import ditas.evaluation.digits as digits
    import ditas.pipelines as pipelines
    import ditas.quantization.apply as apply

    for module, name in ((pipelines, "load_pipeline"), (pipelines, "record_pipeline_calibration"),
                         (pipelines, "generate_images"), (apply, "quantize"), (comparison, "compare_recipes"),
                         (bench, "sample_row"), (bench, "quantized_copy"), (batches, "generate"),
                         (sharded, "sample_npz"), (batches, "sample_images"), (digits, "evaluate_digit_samples")):
        monkeypatch.setattr(module, name, _never(name))
    monkeypatch.setattr(torch.distributed, "init_process_group", _never("init_process_group"))


def refused(capsys, argv: list[str], *expected: str, absent: tuple = ()) -> str:
    """Runs the CLI: exit 2, one line on stderr naming ``expected``, none of ``absent`` written."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ditas {argv[0]}: error: ") and "Traceback" not in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    for path in absent:
        assert not Path(path).exists(), path
    return lines[0]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-pixart"
    fm.save_tiny_pixart_pipeline(path)
    return path


@pytest.fixture(scope="module")
def quantized_pipe(pipe_dir, tmp_path_factory):
    q = tmp_path_factory.mktemp("qp") / "q"
    assert main(["quantize", "--model", str(pipe_dir), "--recipe", "rtn", "--out", str(q), *QUANT]) == 0
    return q


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory):
    model = random_dit(3, depth=1)
    ditas.quantize_(model, ditas.recipe_config("rtn", steps=2, calib_labels=1))
    return ditas.save_quantized(model, tmp_path_factory.mktemp("q") / "quant")


# ----------------------------------------------------------------------------------------------
#                                   Image sizes and memory
# ----------------------------------------------------------------------------------------------


def test_quantize_pipeline_height_not_a_multiple(tmp_path, pipe_dir, capsys, no_long_work):
    out = tmp_path / "q"
    refused(capsys, ["quantize", "--model", str(pipe_dir), "--height", "13", "--out", str(out), *QUANT],
            "--height 13", "multiples of 8", absent=[out])


def test_quantize_pipeline_huge_size_refused_by_memory_estimate(tmp_path, pipe_dir, capsys, no_long_work):
    out = tmp_path / "q"
    line = refused(capsys, ["quantize", "--model", str(pipe_dir), "--height", "100000", "--width", "100000",
                            "--out", str(out), *QUANT], "calibration needs at least", "GiB", absent=[out])
    assert "available" in line or "free" in line  # the limit is named beside the estimate


def test_sample_quantized_pipeline_bad_sizes(tmp_path, quantized_pipe, capsys, no_long_work, monkeypatch):
    import ditas.quantization.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_quantized", _never("load_quantized"))
    png = tmp_path / "x.png"
    base = ["sample", "--quantized", str(quantized_pipe), "--prompt", "a cat", "--out", str(png)]
    refused(capsys, [*base, "--height", "13"], "--height 13", "multiples of 8", absent=[png])
    refused(capsys, [*base, "--height", "100000", "--width", "100000"], "needs at least", "GiB", absent=[png])


def test_memory_problem_names_estimate_and_limit(monkeypatch):
    import ditas.validate as v

    monkeypatch.setattr(v, "available_memory", lambda device: (2 * v.GiB, "of RAM available"))
    assert v.memory_problem(v.GiB, "cpu", "x", "y") is None
    text = v.memory_problem(3 * v.GiB, "cpu", "sampling", "3 images")
    assert text == "sampling needs at least 3.0 GiB (3 images), more than the 2.0 GiB of RAM available"


def test_available_memory_is_positive():
    from ditas.validate import available_memory

    limit, where = available_memory("cpu")
    assert limit > 0 and "RAM" in where


# ----------------------------------------------------------------------------------------------
#                                  Overflowing and ignored options
# ----------------------------------------------------------------------------------------------


def test_huge_device_index(tmp_path, capsys, no_long_work):
    png = tmp_path / "x.png"
    refused(capsys, ["sample", "--device", "cuda:99999999999999999999", "--out", str(png)], "--device cuda:",
            absent=[png])
    with pytest.raises(DitasError):
        ditas.load_dit(device="cuda:99999999999999999999")


def test_huge_class_label(tmp_path, capsys, no_long_work):
    png = tmp_path / "x.png"
    refused(capsys, ["sample", "--classes", "99999999999999999999999", "--out", str(png)], "--classes",
            "out of range", absent=[png])
    refused(capsys, ["sample", "--classes", "3,10", "--out", str(png)], "class label 10 is out of range", "0..9",
            absent=[png])


def test_eval_device_checked_in_digits_mode(tmp_path, capsys, no_long_work):
    out = tmp_path / "m.json"
    refused(capsys, ["eval", str(tmp_path / "s.npz"), "--device", "xyz", "--json", str(out)], "--device 'xyz'",
            absent=[out])


def test_world_size_without_torchrun(tmp_path, capsys, no_long_work, monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    png, out = tmp_path / "x.png", tmp_path / "c"
    refused(capsys, ["sample", "--out", str(png)], "WORLD_SIZE=2", "MASTER_ADDR", "torchrun", absent=[png])
    refused(capsys, ["compare", "--num", "4", "--out", str(out)], "WORLD_SIZE=2", absent=[out])
    monkeypatch.setenv("WORLD_SIZE", "two")
    refused(capsys, ["sample", "--out", str(png)], "WORLD_SIZE='two'", absent=[png])


# ----------------------------------------------------------------------------------------------
#                                        Late failures
# ----------------------------------------------------------------------------------------------


def test_calib_guidance_nan(tmp_path, pipe_dir, capsys, no_long_work):
    out = tmp_path / "q"
    refused(capsys, ["quantize", "--model", str(pipe_dir), "--calib-guidance", "nan", "--out", str(out), *QUANT],
            "--calib-guidance", "finite", absent=[out])


def test_compare_num_beyond_memory(tmp_path, capsys, no_long_work):
    out = tmp_path / "c"
    refused(capsys, ["compare", "--num", "100000000", "--recipes", "fp,rtn", "--no-progress", "--out", str(out)],
            "--num 100000000 needs at least", "GiB", absent=[out])


def test_quantize_calib_labels_beyond_memory(tmp_path, capsys, no_long_work):
    out = tmp_path / "q"
    refused(capsys, ["quantize", "--calib-labels", "100000000", "--no-progress", "--out", str(out)],
            "calibration on 100000000 labels needs at least", absent=[out])


def test_benchmark_num_beyond_memory_or_disk(tmp_path, capsys, no_long_work):
    out = tmp_path / "b"
    refused(capsys, ["benchmark", "--num", "100000000", "--recipes", "fp", "--steps", "2", "--no-progress",
                     "--out", str(out)], "--num 100000000", "GiB", absent=[out])


def test_benchmark_num_below_precision_recall_minimum(tmp_path, capsys, no_long_work):
    out = tmp_path / "b"
    refused(capsys, ["benchmark", "--recipes", "fp", "--num", "3", "--steps", "2", "--out", str(out)],
            "--num 3", "at least 4 images", absent=[out])


# ----------------------------------------------------------------------------------------------
#                                     Pipeline components
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["tokenizer", "text_encoder", "vae", "scheduler"])
def test_pipeline_without_a_component(tmp_path, pipe_dir, capsys, no_long_work, component):
    broken = shutil.copytree(pipe_dir, tmp_path / "pipe")
    shutil.rmtree(broken / component)
    out, png = tmp_path / "q", tmp_path / "x.png"
    refused(capsys, ["quantize", "--model", str(broken), "--out", str(out), *QUANT],
            f"'{component}'", f"no {component}/ folder", absent=[out])
    refused(capsys, ["sample", "--model", str(broken), "--prompt", "a cat", "--out", str(png)],
            f"no {component}/ folder", absent=[png])


def test_complete_pipeline_passes_the_component_check(pipe_dir):
    from ditas.pipelines import check_pipeline_components, image_size_problem, pipeline_geometry

    index = check_pipeline_components(pipe_dir)
    geometry = pipeline_geometry(pipe_dir, index)
    assert geometry["multiple"] == 8 and geometry["default"] == 8 and geometry["pixels_per_token"] == 2
    assert image_size_problem(geometry, 16, 24) is None and image_size_problem(geometry, 12, None)


def test_sd3_size_above_its_position_embedding(tmp_path):
    from ditas.pipelines import check_pipeline_components, image_size_problem, pipeline_geometry

    fm.save_tiny_sd3_pipeline(tmp_path / "sd3")
    geometry = pipeline_geometry(tmp_path / "sd3", check_pipeline_components(tmp_path / "sd3"))
    assert geometry["multiple"] == 2 and geometry["max"] == 16
    assert image_size_problem(geometry, 16, 16) is None
    assert "at most 16" in image_size_problem(geometry, 18, 8)


# ----------------------------------------------------------------------------------------------
#                                     The Python API
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["xyz", "cuda:99999999999999999999", "cpu:0", "cuda:%d"])
def test_load_quantized_validates_the_device(quant_dir, device):
    if "%d" in device:
        device = device % torch.cuda.device_count()  # one past the last device: never there
    with pytest.raises(DitasError, match="--device"):
        ditas.load_quantized(quant_dir, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(DitasError, match="no CUDA device"):
            ditas.load_quantized(quant_dir, device="cuda")
    assert ditas.load_quantized(quant_dir, device="cpu").quant_config is not None


@pytest.mark.parametrize("call, text", [
    (lambda: ditas.quantize_(None), "model must be a torch.nn.Module"),
    (lambda: ditas.quantize_(random_dit(1, depth=1), "rtn", calib=5), "calib must be"),
    (lambda: ditas.recipe_config(["ditas"]), "unknown recipe"),
    (lambda: ditas.recipe_config(None), "unknown recipe"),
    (lambda: ditas.save_quantized(None, "x"), "model must be"),
    (lambda: ditas.load_quantized(None), "path must be a path"),
    (lambda: ditas.load_quantized("x", kernel="nope"), "unknown kernel"),
    (lambda: ditas.load_dit(5), "path must be a path"),
    (lambda: ditas.load_dit(config="DiT-S/2"), "config must be a DiTConfig"),
    (lambda: ditas.save_dit(None, "x"), "model must be a ditas DiT"),
    (lambda: ditas.save_dit(random_dit(1, depth=1), None), "path must be a path"),
    (lambda: ditas.dit_config(None), "unknown DiT model"),
    (lambda: ditas.DiTConfig(depth=-1), "invalid DiT config"),
])
def test_public_functions_raise_one_line_config_errors(call, text):
    with pytest.raises(ConfigError, match=text) as info:
        call()
    assert "\n" not in str(info.value)


def test_quantize_unknown_kernel_leaves_the_model_untouched():
    model = random_dit(2, depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="unknown kernel"):
        ditas.quantize_(model, ditas.recipe_config("rtn", steps=2, calib_labels=1), kernel="xyz")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_world_env_problem_cases():
    from ditas.validate import world_env_problem

    assert world_env_problem({}) is None and world_env_problem({"WORLD_SIZE": "1"}) is None
    full = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert world_env_problem(full) is None
    assert "RANK='2'" in world_env_problem({**full, "RANK": "2"})
    assert "MASTER_PORT" in world_env_problem({k: v for k, v in full.items() if k != "MASTER_PORT"})
