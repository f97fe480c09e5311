"""End to end on the command line: a tiny random PixArt pipeline folder (T5 encoder and tokenizer
built in code, no download) through ``ditas quantize --model PIPELINE_DIR`` and
``ditas sample --quantized DIR`` (which finds the pipeline by itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditas.cli.main import main
from ditas.pipelines import PIPELINE_FILE, read_prompts
from ditas.quantization.linear import QuantLinear
import family_models as fm

pytest.importorskip("transformers")

QUANT_ARGS = ["--calib-steps", "2", "--calib-prompts", "3", "--calib-batch", "2", "--lora-rank", "4",
              "--lora-rounds", "2", "--no-progress"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-pixart"
    fm.save_tiny_pixart_pipeline(path)
    return path


def _png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_quantize_and_sample_a_pipeline_on_the_cli(tmp_path, pipeline_dir, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(pipeline_dir), "--out", str(q), *QUANT_ARGS]) == 0
    assert "3 prompts x 2 steps" in capsys.readouterr().out
    ref = json.loads((q / PIPELINE_FILE).read_text())
    assert ref["pipeline"] == str(pipeline_dir.resolve()) and ref["pipeline_class"] == "PixArtAlphaPipeline"
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["family"] == "pixart"
    report = json.loads((q / "report.json").read_text())
    # 3 prompts in batches of 2 -> 2 pipeline runs x 2 steps = 4 transformer calls, recorded
    assert report["calibration"]["transformer_calls"] == 4 and report["calibration"]["prompts"] == 3

    quant_png, fp_png = tmp_path / "q.png", tmp_path / "fp.png"
    args = ["--prompt", "a red fox in the snow", "--prompt", "a city at night", "--steps", "3", "--seed", "5"]
    assert main(["sample", "--quantized", str(q), *args, "--out", str(quant_png)]) == 0  # no --model: pipeline.json
    assert main(["sample", "--model", str(pipeline_dir), *args, "--out", str(fp_png)]) == 0
    a, b = _png(quant_png), _png(fp_png)
    assert a.shape == b.shape and a.shape[0] >= 8 and a.shape[1] >= 16  # two 8x8 images side by side
    assert not np.array_equal(a, b)  # the quantized transformer was used
    again = tmp_path / "again.png"
    assert main(["sample", "--quantized", str(q), *args, "--out", str(again)]) == 0
    assert np.array_equal(_png(again), a)  # same seed, same images


def test_quantized_transformer_drops_into_the_users_pipeline(tmp_path, pipeline_dir):
    from ditas.pipelines import generate_images, load_pipeline
    from ditas.quantization.checkpoint import load_quantized

    q = tmp_path / "q"
    assert main(["quantize", "--model", str(pipeline_dir), "--out", str(q), "--recipe", "rtn", *QUANT_ARGS]) == 0
    pipe = load_pipeline(pipeline_dir)
    pipe.transformer = load_quantized(q, kernel="simulated")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_q, QuantLinear)
    images = generate_images(pipe, "a cat", steps=2, seed=0, progress=False)
    assert len(images) == 1 and images[0].size == (8, 8)


def test_bad_pipeline_input_is_a_clear_error(tmp_path, pipeline_dir, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing\n\n")
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(pipeline_dir), "--prompts", str(empty), "--out", str(q),
                 *QUANT_ARGS]) == 2
    assert "holds no prompts" in capsys.readouterr().err and not q.exists()
    assert main(["quantize", "--model", str(pipeline_dir), "--calib-labels", "4", "--out", str(q), *QUANT_ARGS]) == 2
    assert "--calib-labels is for class-conditional DiT" in capsys.readouterr().err and not q.exists()
    bad = tmp_path / "notapipe"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "X", "transformer": ["diffusers", "UNet2DModel"]}))
    assert main(["quantize", "--model", str(bad), "--out", str(q), *QUANT_ARGS]) == 2
    assert "UNet2DModel" in capsys.readouterr().err and not q.exists()
    assert main(["sample", "--quantized", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert "does not record its pipeline" in capsys.readouterr().err
    assert main(["sample", "--model", str(pipeline_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["sample", "--model", str(pipeline_dir), "--prompt", "x", "--guidance", "-1",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--guidance" in capsys.readouterr().err
    for guidance in ("1e30", "nan"):  # checked like --cfg-scale, before any work
        assert main(["sample", "--quantized", str(pipeline_dir), "--prompt", "x", "--guidance", guidance,
                     "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert "--guidance must be a number in 0..100" in err and len(err.strip().splitlines()) == 1
    flux = tmp_path / "flux"
    fm.save_tiny_flux_pipeline(flux)
    qf = tmp_path / "qf"
    assert main(["quantize", "--model", str(flux), "--out", str(qf), "--recipe", "rtn", *QUANT_ARGS,
                 "--height", "8", "--width", "8"]) == 0
    capsys.readouterr()
    assert main(["sample", "--quantized", str(qf), "--model", str(pipeline_dir), "--prompt", "x",
                 "--out", str(tmp_path / "x.png")]) == 2  # a Flux transformer into a PixArt pipeline
    assert "FluxTransformer2DModel" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_shipped_calibration_prompts():
    prompts = read_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    assert all(len(p.split()) >= 4 for p in prompts)


def test_public_api_with_the_users_pipeline(tmp_path, pipeline_dir):
    """The issue's example: record during any pipeline run, quantize in place, save, load, swap in."""
    import ditas
    from ditas.pipelines import generate_images, load_pipeline

    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    with ditas.record_calibration(pipe.transformer) as calib:
        pipe(["a red fox", "a blue house"], num_inference_steps=3, output_type="latent", use_resolution_binning=False,
             clean_caption=False, generator=torch.Generator().manual_seed(0))
    assert calib.steps == 3 and calib.model_calls == 3  # one batched call per step (both guidance halves)
    report = ditas.quantize_(pipe.transformer, ditas.recipe_config("ditas", lora_rank=4, lora_rounds=2), calib)
    assert report["num_layers"] == 14 and isinstance(pipe.transformer.transformer_blocks[1].ff.net[2], QuantLinear)
    in_place = generate_images(pipe, "a cat", steps=2, seed=3, progress=False)[0]
    ditas.save_quantized(pipe.transformer, tmp_path / "q")
    pipe.transformer = ditas.load_quantized(tmp_path / "q", kernel="simulated")
    loaded = generate_images(pipe, "a cat", steps=2, seed=3, progress=False)[0]
    assert np.array_equal(np.asarray(in_place), np.asarray(loaded))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_quantize_and_sample_sd3_and_flux_pipelines_on_the_cli(tmp_path, family, capsys):
    pipe_dir = tmp_path / f"tiny-{family}"
    {"sd3": fm.save_tiny_sd3_pipeline, "flux": fm.save_tiny_flux_pipeline}[family](pipe_dir)
    size = ["--height", "8", "--width", "8"]  # the pipelines' defaults would be 128 px here
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(pipe_dir), "--out", str(q), *QUANT_ARGS, *size]) == 0
    assert json.loads((q / "config.json").read_text())["family"] == family
    assert json.loads((q / "report.json").read_text())["calibration"]["transformer_calls"] == 4
    png = tmp_path / "x.png"
    assert main(["sample", "--quantized", str(q), "--prompt", "a red fox", "--steps", "2", *size,
                 "--out", str(png)]) == 0
    assert _png(png).shape == (12, 12, 3)  # one 8x8 image with a 2-pixel border
    assert "quantized the" in capsys.readouterr().out
