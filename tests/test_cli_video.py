"""End to end on the command line: a tiny random Wan 2.1 text-to-video pipeline folder (UMT5 text
encoder and T5 tokenizer built in code, no download) through ``ditas quantize --model
PIPELINE_DIR`` and ``ditas sample --prompt ... --frames N --out clip.mp4 | clip.gif | frames/``."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from ditas.cli.main import main
from ditas.pipelines import PIPELINE_FILE, load_pipeline
from ditas.quantization.checkpoint import load_quantized
import family_models as fm

pytest.importorskip("transformers")
imageio = pytest.importorskip("imageio")

SIZE = ["--height", "32", "--width", "48"]
QUANT_ARGS = ["--calib-steps", "2", "--calib-prompts", "3", "--calib-batch", "2", "--lora-rank", "4",
              "--lora-rounds", "2", "--frames", "5", *SIZE, "--no-progress"]
SAMPLE_ARGS = ["--prompt", "a red fox in the snow", "--steps", "2", "--seed", "3", *SIZE, "--no-progress"]


def save_tiny_wan_pipeline(path, seed: int = 0) -> None:
    """A Wan 2.1 text-to-video pipeline folder, all random and tiny: a 2-block WanTransformer3DModel
    (2 heads of 8), a 1-layer UMT5 encoder (24 wide), a Wan VAE with 4 latent channels that
    compresses 4 frames into one and 8x8 pixels into one, a flow-matching scheduler."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer, t5 = fm._t5()  # the T5 tokenizer built in code (Wan's tokenizer is a T5 one)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=t5.config.vocab_size, d_model=fm.TEXT_DIM, d_kv=8, d_ff=32,
                                          num_layers=1, num_heads=2, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=fm.HEADS,
                                        attention_head_dim=fm.HEAD_DIM, in_channels=4, out_channels=4,
                                        text_dim=fm.TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2,
                                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=fm.add_outliers(transformer, seed),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(str(path))


def save_tiny_cogvideox_pipeline(path, seed: int = 0) -> None:
    """A CogVideoX pipeline folder, all random and tiny: a 2-block CogVideoXTransformer3DModel (its
    text length is the pipeline's 226 padded tokens), the 1-layer T5 encoder, a 4-level CogVideoX
    VAE compressing 4 frames into one, a DDIM scheduler. Another family than Wan: one transformer
    call per step for both guidance halves, the temporal factor under another name."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tokenizer, encoder = fm._t5()
    transformer = CogVideoXTransformer3DModel(num_attention_heads=fm.HEADS, attention_head_dim=fm.HEAD_DIM, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=fm.TEXT_DIM, num_layers=2,
                                              sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=226)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
                                 block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=CogVideoXDDIMScheduler(),
                             transformer=fm.add_outliers(transformer, seed))
    pipe.save_pretrained(str(path))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-wan"
    save_tiny_wan_pipeline(path)
    return path


def _frames(folder) -> np.ndarray:
    from PIL import Image

    names = sorted(p.name for p in folder.glob("frame_*.png"))
    return np.stack([np.asarray(Image.open(folder / n).convert("RGB")) for n in names])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_quantize_a_wan_pipeline_and_write_an_mp4(tmp_path, wan_dir, capsys):
    import imageio.v3 as iio

    q = tmp_path / "q"
    assert main(["quantize", "--model", str(wan_dir), "--out", str(q), *QUANT_ARGS]) == 0
    report = json.loads((q / "report.json").read_text())
    # 3 prompts in batches of 2 -> 2 pipeline runs x 2 steps x 2 (Wan calls the transformer once with the
    # prompts and once with the negative prompts) = 8 transformer calls, of 5-frame clips
    assert report["calibration"]["transformer_calls"] == 8 and report["calibration"]["num_frames"] == 5
    assert json.loads((q / PIPELINE_FILE).read_text())["pipeline_class"] == "WanPipeline"
    transformer = load_quantized(q, kernel="simulated")
    # diffusers alone loads the folder's float transformer over a passed one (Wan's __init__ defaults it)
    assert load_pipeline(wan_dir, transformer=transformer).transformer is transformer
    capsys.readouterr()

    clip = tmp_path / "clip.mp4"
    assert main(["sample", "--quantized", str(q), *SAMPLE_ARGS, "--frames", "9", "--fps", "8",
                 "--out", str(clip)]) == 0  # no --model: pipeline.json names the pipeline
    assert "wrote 9 frames (48x32, 8 fps)" in capsys.readouterr().out
    decoded = iio.imread(clip, plugin="FFMPEG")
    assert decoded.shape == (9, 32, 48, 3) and decoded.dtype == np.uint8
    assert iio.immeta(clip, plugin="FFMPEG")["fps"] == 8

    quant, fp = tmp_path / "quant", tmp_path / "fp"
    assert main(["sample", "--quantized", str(q), *SAMPLE_ARGS, "--frames", "5", "--out", f"{quant}/"]) == 0
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, "--frames", "5", "--out", f"{fp}/"]) == 0
    a, b = _frames(quant), _frames(fp)
    assert a.shape == b.shape == (5, 32, 48, 3)
    assert not np.array_equal(a, b)  # the quantized transformer made the quantized clip
    err = np.abs(a.astype(int) - b.astype(int)).mean()
    assert err < 8, err  # ... and it is still the float model's clip, not noise (measured: 1.1 of 255)


def test_quantize_a_cogvideox_pipeline_and_write_a_gif(tmp_path, capsys):
    from PIL import Image

    pipe, q, gif = tmp_path / "tiny-cogvideox", tmp_path / "q", tmp_path / "clip.gif"
    save_tiny_cogvideox_pipeline(pipe)
    size = ["--height", "32", "--width", "32"]
    assert main(["quantize", "--model", str(pipe), "--out", str(q), *QUANT_ARGS, *size]) == 0
    # 3 prompts in batches of 2 -> 2 pipeline runs x 2 steps (both guidance halves in one call)
    assert json.loads((q / "report.json").read_text())["calibration"]["transformer_calls"] == 4
    assert main(["sample", "--quantized", str(q), *SAMPLE_ARGS, *size, "--frames", "9", "--out", str(gif)]) == 0
    with Image.open(gif) as im:  # CogVideoX's 8 fps: 120 ms a frame
        assert (im.n_frames, im.size, im.info["duration"]) == (9, (32, 32), 120)


def test_float_pipeline_clip_as_gif_and_png_frames(tmp_path, wan_dir, capsys):
    from PIL import Image

    gif, frames = tmp_path / "clip.gif", tmp_path / "frames"
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, "--out", str(gif)]) == 0
    with Image.open(gif) as im:  # default: 1 + 4 x the VAE's 4-frame compression = 17 frames at Wan's 16 fps (GIF: 1/100 s)
        assert (im.n_frames, im.size, im.info["duration"], im.info["loop"]) == (17, (48, 32), 60, 0)
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, "--frames", "5", "--out", f"{frames}/"]) == 0
    meta = json.loads((frames / "config.json").read_text())
    assert (meta["frames"], meta["fps"], meta["prompt"]) == (5, 16, "a red fox in the snow")
    first = _frames(frames)
    assert first.shape == (5, 32, 48, 3) and len(list(frames.iterdir())) == 6

    capsys.readouterr()  # an existing output: refused without --overwrite, replaced with it (same seed, same clip)
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, "--frames", "5", "--out", f"{frames}/"]) == 2
    assert "exists already" in _one_line_error(capsys)
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, "--frames", "5", "--out", str(frames),
                 "--overwrite"]) == 0
    assert np.array_equal(_frames(frames), first)
    mine = tmp_path / "mine"  # a folder ditas did not write is never replaced
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, "--frames", "5", "--out", f"{mine}/",
                 "--overwrite"]) == 2
    assert "not a folder ditas wrote" in _one_line_error(capsys) and (mine / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("extra, message", [
    (["--out", "clip.avi"], "unknown extension '.avi'"),
    (["--out", "clip.mp4", "--frames", "0"], "--frames must be at least 1"),
    (["--out", "clip.mp4", "--frames", "6"], "give 5 or 9"),
    (["--out", "clip.gif", "--fps", "0"], "--fps must be"),
    (["--out", "clip.gif", "--prompt", "a cat"], "one --prompt"),
])
def test_bad_sample_input_is_one_line_before_any_work(tmp_path, wan_dir, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, *extra]) == 2
    assert message in _one_line_error(capsys)  # one line: refused before the pipeline was loaded
    assert list(tmp_path.iterdir()) == []


def test_size_the_pipeline_refuses_is_one_line(tmp_path, wan_dir, capsys):
    out = tmp_path / "c.gif"  # Wan takes multiples of 16 pixels: its own check, after loading, before any step
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, "--height", "24", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "WanPipeline refused the run" in err.strip().splitlines()[-1]
    assert not out.exists()


def test_mp4_without_imageio_names_the_extra(tmp_path, wan_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if the wheel were not installed
    out = tmp_path / "clip.mp4"
    assert main(["sample", "--model", str(wan_dir), *SAMPLE_ARGS, "--out", str(out)]) == 2
    assert "ditas[video]" in _one_line_error(capsys) and not out.exists()


def test_quantized_folder_without_its_pipeline_is_one_line(tmp_path, capsys):
    assert main(["sample", "--quantized", str(tmp_path), *SAMPLE_ARGS, "--out", str(tmp_path / "c.mp4")]) == 2
    assert "does not record its pipeline: give --model PIPELINE_DIR" in _one_line_error(capsys)


def test_bad_quantize_input_is_one_line(tmp_path, wan_dir, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(wan_dir), "--out", str(q), *QUANT_ARGS, "--frames", "7"]) == 2
    assert "give 5 or 9" in _one_line_error(capsys) and not q.exists()
    assert main(["quantize", "--out", str(q), "--frames", "5"]) == 2  # the default DiT makes no video
    assert "for video pipelines" in _one_line_error(capsys) and not q.exists()


def test_image_to_video_pipeline_is_refused_in_one_line(tmp_path, wan_dir, capsys):
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    index = json.loads((wan_dir / "model_index.json").read_text())
    (i2v / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    assert main(["sample", "--model", str(i2v), *SAMPLE_ARGS, "--out", str(tmp_path / "c.gif")]) == 2
    assert "needs image besides the prompt" in _one_line_error(capsys)
