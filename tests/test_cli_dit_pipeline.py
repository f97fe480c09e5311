"""diffusers' DiTPipeline on the command line, like the text-to-image pipelines but with labels:
``ditas quantize --model DIT_PIPELINE`` (a recorded pipeline run on labels, at the pipeline's own
steps and guidance), ``ditas sample --model/--quantized ... --classes``; a diffusers DiT saved by
``ditas.save_quantized`` sampled with ``--model Q --vae V`` and ``--quantized Q``; ``--out DIR/``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ditas
import family_models as fm
from ditas.cli.main import main
from ditas.pipelines import PIPELINE_FILE, call_defaults
from ditas.quantization.linear import QuantLinear
from quant_helpers import tiny_diffusers_dit

pytest.importorskip("diffusers")

QUANT = ["--calib-labels", "2", "--lora-rank", "4", "--lora-rounds", "2", "--no-progress"]
SAMPLE = ["--steps", "2", "--seed", "4", "--no-progress"]


def _save_dit_pipeline(path, num_classes: int = 1000) -> None:
    """A tiny DiTPipeline (1000 classes: DiTPipeline guides with the null label 1000)."""
    from diffusers import DDIMScheduler, DiTPipeline

    DiTPipeline(transformer=tiny_diffusers_dit(0, num_classes=num_classes), vae=fm._vae(4),
                scheduler=DDIMScheduler()).save_pretrained(path)


@pytest.fixture(scope="module")
def dit_pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("ditpipe") / "dit"
    _save_dit_pipeline(path)
    return path


@pytest.fixture(scope="module")
def quantized(dit_pipe, tmp_path_factory):
    q = tmp_path_factory.mktemp("ditq") / "q"
    assert main(["quantize", "--model", str(dit_pipe), "--out", str(q), "--calib-steps", "3", *QUANT]) == 0
    return q


def _png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_a_cli_quantized_dit_pipeline_records_labels_and_comes_back_in_diffusers_class(dit_pipe, quantized):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    cfg = json.loads((quantized / "config.json").read_text())
    assert cfg["family"] == "diffusers-dit"
    assert json.loads((quantized / PIPELINE_FILE).read_text())["pipeline_class"] == "DiTPipeline"
    calib = json.loads((quantized / "report.json").read_text())["calibration"]
    # 2 labels (one pipeline call per step, labels and null labels batched) x 3 steps at DiTPipeline's guidance
    assert calib["labels"] == 2 and calib["transformer_calls"] == 3 and calib["guidance_scale"] == 4.0
    t = ditas.load_quantized(quantized, kernel="simulated")
    assert type(t) is DiTTransformer2DModel and isinstance(t.transformer_blocks[0].attn1.to_q, QuantLinear)
    pipe = DiTPipeline.from_pretrained(dit_pipe, transformer=t)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 8, 8, 3) and np.isfinite(out).all()


def test_sample_a_dit_pipeline_with_classes_float_and_quantized(tmp_path, dit_pipe, quantized, capsys):
    fp, q = tmp_path / "fp.png", tmp_path / "q.png"
    assert main(["sample", "--model", str(dit_pipe), "--classes", "1,2", *SAMPLE, "--out", str(fp)]) == 0
    assert main(["sample", "--quantized", str(quantized), "--classes", "1,2", *SAMPLE, "--out", str(q)]) == 0
    a, b = _png(fp), _png(q)
    assert a.shape == b.shape and not np.array_equal(a, b)  # the quantized transformer ran
    assert main(["sample", "--model", str(dit_pipe), "--prompt", "a cat", *SAMPLE, "--out", str(tmp_path / "x.png")]) == 2
    assert "--classes" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert main(["sample", "--model", str(dit_pipe), "--classes", "1000", *SAMPLE, "--out", str(tmp_path / "x.png")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_an_api_saved_diffusers_dit_samples_with_model_and_with_quantized(tmp_path, dit_pipe):
    m = tiny_diffusers_dit(0, num_classes=1000)
    ditas.quantize_(m, ditas.recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4, lora_rounds=2))
    ditas.save_quantized(m, tmp_path / "q")  # no pipeline.json: sampled by ditas' own sampler with a VAE
    vae = str(dit_pipe / "vae")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["sample", "--model", str(tmp_path / "q"), "--vae", vae, "--classes", "1,2", *SAMPLE, "--out", str(a)]) == 0
    assert main(["sample", "--quantized", str(tmp_path / "q"), "--vae", vae, "--classes", "1,2", *SAMPLE,
                 "--out", str(b)]) == 0
    assert np.array_equal(_png(a), _png(b))  # --quantized of a quantized class-conditional model is --model


def test_a_dit_pipeline_without_1000_classes_is_refused_before_work_when_guided(tmp_path, capsys):
    _save_dit_pipeline(tmp_path / "p10", num_classes=10)
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tmp_path / "p10"), "--out", str(q), "--calib-steps", "2", *QUANT]) == 2
    err = capsys.readouterr().err
    assert "null label 1000" in err and "--calib-guidance 1" in err and not q.exists()
    assert main(["quantize", "--model", str(tmp_path / "p10"), "--out", str(q), "--calib-steps", "2",
                 "--calib-guidance", "1", *QUANT]) == 0
    assert main(["sample", "--quantized", str(q), "--classes", "3", *SAMPLE, "--out", str(tmp_path / "x.png")]) == 2
    assert "--guidance 1" in capsys.readouterr().err
    assert main(["sample", "--quantized", str(q), "--classes", "3", "--guidance", "1", *SAMPLE,
                 "--out", str(tmp_path / "x.png")]) == 0


def test_pipeline_calibration_defaults_to_the_pipelines_own_steps_and_guidance(tmp_path, dit_pipe):
    from diffusers import DiTPipeline, FluxPipeline, PixArtSigmaPipeline

    assert call_defaults(DiTPipeline) == {"num_inference_steps": 50, "guidance_scale": 4.0}
    assert call_defaults(PixArtSigmaPipeline) == {"num_inference_steps": 20, "guidance_scale": 4.5}
    assert call_defaults(FluxPipeline) == {"num_inference_steps": 28, "guidance_scale": 3.5}
    assert call_defaults(dit_pipe) == call_defaults(DiTPipeline)  # read from the folder, nothing loaded
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(dit_pipe), "--out", str(q), "--recipe", "rtn", "--calib-labels", "1",
                 "--no-progress"]) == 0
    report = json.loads((q / "report.json").read_text())
    assert report["calibration"]["steps"] == 50 and report["calibration"]["transformer_calls"] == 50
    assert report["calibration"]["guidance_scale"] == 4.0
    stored = json.loads((q / "config.json").read_text())["quantization"]["config"]["calibration"]
    assert stored["steps"] == 50 and stored["cfg_scale"] == 4.0  # the folder says what it was calibrated on


def test_out_folder_writes_one_borderless_png_per_image(tmp_path, dit_pipe, quantized, capsys):
    grid, folder = tmp_path / "grid.png", tmp_path / "imgs"
    args = ["sample", "--quantized", str(quantized), "--classes", "1,2", *SAMPLE]
    assert main([*args, "--out", str(grid)]) == 0
    assert main([*args, "--out", f"{folder}/"]) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["0000-1.png", "0001-2.png"]
    one = _png(folder / "0000-1.png")
    assert one.shape == (8, 8, 3)  # the image itself: no border
    assert _png(grid).shape[0] > 8  # a .png target keeps the bordered grid
    assert np.array_equal(_png(grid)[2:10, 2:10], one)
    before = (folder / "0000-1.png").read_bytes()
    assert main([*args, "--seed", "9", "--out", str(folder)]) == 2  # an existing folder: files are not replaced
    assert "exists already" in capsys.readouterr().err and (folder / "0000-1.png").read_bytes() == before
    dit = tmp_path / "dit"  # ditas' own DiT path (the embedded default model)
    assert main(["sample", "--classes", "3,5", "--steps", "2", "--no-progress", "--out", f"{dit}/"]) == 0
    assert sorted(p.name for p in dit.iterdir()) == ["0000-3.png", "0001-5.png"]


def test_out_folder_names_images_by_prompt(tmp_path):
    from ditas.image_files import folder_paths, is_folder_target

    assert is_folder_target("x/") and is_folder_target(tmp_path) and not is_folder_target(tmp_path / "x.png")
    paths = folder_paths(tmp_path / "o", ["A red fox, in the snow!", "a city at night"])
    assert [p.name for p in paths] == ["0000-a-red-fox-in-the-snow.png", "0001-a-city-at-night.png"]


def test_the_cli_prints_a_capped_lora_rank_and_reports_layer_sizes(tmp_path, dit_pipe, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(dit_pipe), "--out", str(q), "--calib-steps", "2", "--calib-labels", "1",
                 "--lora-rank", "16", "--lora-dtype", "float32", "--lora-rounds", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: transformer_blocks.0.attn1.to_q: LoRA rank 16" in err and "capped to 12" in err
    report = json.loads((q / "report.json").read_text())
    assert report["warnings"] and all(s["stored"] < s["float"] for s in report["layer_bytes"].values())
