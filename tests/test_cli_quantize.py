"""``ditas quantize`` and ``ditas compare`` end to end on a tiny pixel-space DiT."""

from __future__ import annotations

import json

import pytest
import torch

import ditas
from ditas.cli.main import main
from ditas.quantization.linear import QuantLinear
from quant_helpers import random_dit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    ditas.save_dit(random_dit(11, depth=2), path)
    return path


def test_quantize_writes_a_loadable_folder_and_report(tmp_path, model_dir, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(model_dir), "--recipe", "ditas", "--w-bits", "4", "--a-bits", "8",
               "--calib-labels", "3,1", "--calib-steps", "3", "--lora-rank", "4", "--lora-rounds", "2",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    assert "full-model forward passes" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "ditas" and report["bits"] == {"weights": 4, "activations": 8}
    assert report["forward_passes"]["full_model_forward_passes"] == 6
    assert len(report["layers"]) == 8 and all("alpha" in v for v in report["layers"].values())
    assert {"calibration_run_s", "blockwise_search_s", "convert_s", "save_s"} <= set(report["wall_time_s"])
    assert report["peak_memory_mb"] > 0
    m = ditas.load_dit(out, kernel="simulated")
    assert isinstance(m.blocks[1].mlp.fc2, QuantLinear) and m.blocks[1].mlp.fc2.lora_rank == 4
    rc = main(["sample", "--model", str(out), "--kernel", "simulated", "--num", "2", "--steps", "2",
               "--out", str(tmp_path / "s.png")])
    assert rc == 0 and (tmp_path / "s.png").exists()


@pytest.mark.parametrize("argv, words", [
    (["--w-bits", "9"], "weight bits"),
    (["--a-bits", "3"], "activation bits"),
    (["--calib-labels", "1,x"], "calib-labels"),
    (["--calib-labels", "3,99"], "out of range"),
    (["--a-bits", "8", "--late-below", "0.4", "--late-a-bits", "8"], "more bits than the others"),
    (["--late-below", "1.5"], "fraction of the timestep range"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, model_dir, capsys, argv, words):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(model_dir), "--calib-steps", "2", "--no-progress", "--out", str(out)] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quantize_with_late_steps_says_so_and_saves_them(tmp_path, model_dir, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(model_dir), "--recipe", "rtn", "--a-bits", "4", "--late-below", "0.3",
               "--late-a-bits", "8", "--calib-steps", "2", "--calib-labels", "1", "--no-progress", "--out", str(out)])
    assert rc == 0 and "(W4A4, A8 below 0.3 of the timesteps)" in capsys.readouterr().out
    m = ditas.load_dit(out)
    assert {(q.activation_format.bits, q.late_activation_format.bits) for q in m.modules()
            if isinstance(q, QuantLinear)} == {(4, 8)}


def test_quantizing_a_quantized_model_is_refused(tmp_path, model_dir, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--recipe", "rtn", "--calib-steps", "2",
                 "--calib-labels", "1", "--no-progress", "--out", str(out)]) == 0
    rc = main(["quantize", "--model", str(out), "--calib-steps", "2", "--no-progress", "--out", str(tmp_path / "r")])
    assert rc == 2 and "quantized" in capsys.readouterr().err


def test_compare_writes_json_grid_and_table(tmp_path, model_dir, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(model_dir), "--recipes", "fp,rtn,ditas,ditas@w3a8", "--num", "4",
               "--steps", "2", "--calib-steps", "2", "--calib-labels", "2", "--lora-rank", "4", "--lora-rounds", "2",
               "--batch-size", "3", "--eps-samples", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| recipe |" in text and "ditas@w3a8" in text
    data = json.loads((out / "compare.json").read_text())
    assert list(data["recipes"]) == ["fp", "rtn@w4a8", "ditas@w4a8", "ditas@w3a8"]
    assert data["recipes"]["fp"]["eps_mse"] == 0.0
    for name in ("rtn@w4a8", "ditas@w4a8", "ditas@w3a8"):
        assert data["recipes"][name]["eps_mse"] > 0
    assert (out / "grid.png").exists()
    rc = main(["compare", "--model", str(model_dir), "--recipes", "fp,gptq", "--out", str(tmp_path / "c2")])
    assert rc == 2 and not (tmp_path / "c2").exists()


def test_lora_dtype_bfloat16_is_the_default_stored_and_reloaded(tmp_path):
    base = ["quantize", "--recipe", "ditas", "--calib-steps", "2", "--calib-labels", "2", "--lora-rank", "4",
            "--lora-rounds", "1", "--no-progress"]
    assert main([*base, "--lora-dtype", "float32", "--out", str(tmp_path / "f32")]) == 0
    assert main([*base, "--out", str(tmp_path / "b16")]) == 0  # the recipe's default: bf16
    f32, b16 = ditas.load_dit(tmp_path / "f32"), ditas.load_dit(tmp_path / "b16")
    layers = {n: m for n, m in b16.named_modules() if isinstance(m, QuantLinear)}
    assert layers and all(m.lora_dtype == torch.bfloat16 for m in layers.values())
    for n, m in f32.named_modules():
        if isinstance(m, QuantLinear):
            assert m.lora_dtype == torch.float32
            # the same fit, rounded once to bf16 after every fold
            assert torch.equal(layers[n].lora_up, m.lora_up.to(torch.bfloat16))
            assert torch.equal(layers[n].lora_down, m.lora_down.to(torch.bfloat16))
    cfg = json.loads((tmp_path / "b16" / "config.json").read_text())
    assert cfg["quantization"]["config"]["lora"]["dtype"] == "bfloat16"
    assert (tmp_path / "b16" / "model.safetensors").stat().st_size < (tmp_path / "f32" / "model.safetensors").stat().st_size
    with pytest.raises(SystemExit) as exc:  # argparse's one-line usage error
        main([*base, "--lora-dtype", "fp8", "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2 and not (tmp_path / "bad").exists()
