"""``ditas sample`` end to end on the tiny reference model, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ditas.cli.main import main


def _run(*args: str) -> int:
    return main(["sample", *args])


def test_png_grid(tmp_path, tiny_weights_path):
    out = tmp_path / "grid.png"
    assert _run("--model", str(tiny_weights_path), "--space", "pixel", "--classes", "3,1,4", "--steps", "5",
                "--seed", "0", "--out", str(out)) == 0
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[1] > 3 * 8


def test_npz_layout_and_label_cycling(tmp_path, tiny_weights_path):
    out = tmp_path / "s.npz"
    assert _run("--model", str(tiny_weights_path), "--space", "pixel", "--classes", "3,1", "--num", "5",
                "--steps", "3", "--sampler", "ddim", "--out", str(out)) == 0
    data = np.load(out)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 3)
    assert data["labels"].dtype == np.int64 and data["labels"].tolist() == [3, 1, 3, 1, 3]


def test_random_labels_follow_seed(tmp_path, tiny_weights_path):
    runs = []
    for i, seed in enumerate(("7", "7", "8")):
        out = tmp_path / f"r{i}.npz"
        assert _run("--model", str(tiny_weights_path), "--space", "pixel", "--num", "6", "--steps", "2",
                    "--seed", seed, "--out", str(out)) == 0
        runs.append(np.load(out))
    assert np.array_equal(runs[0]["arr_0"], runs[1]["arr_0"])
    assert np.array_equal(runs[0]["labels"], runs[1]["labels"])
    assert not np.array_equal(runs[0]["arr_0"], runs[2]["arr_0"])
    assert ((runs[0]["labels"] >= 0) & (runs[0]["labels"] < 10)).all()


def test_latent_model_decodes_with_vae(tmp_path, tiny_weights_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "v.npz"
    assert _run("--model", str(tiny_weights_path), "--vae", str(tmp_path / "vae"), "--classes", "2",
                "--steps", "2", "--out", str(out)) == 0
    assert np.load(out)["arr_0"].shape == (1, 16, 16, 3)  # one 2x upsampling stage


@pytest.mark.parametrize("args,message", [
    (["--classes", "3,10"], "class label 10 is out of range"),
    (["--classes", "a,b"], "comma-separated integers"),
    (["--steps", "0"], "--steps must be an integer in 2..1000"),
    (["--steps", "1"], "--steps must be an integer in 2..1000"),
    (["--num", "0"], "--num must be at least 1"),
])
def test_bad_arguments(tmp_path, tiny_weights_path, capsys, args, message):
    out = tmp_path / "x.png"
    assert _run("--model", str(tiny_weights_path), "--space", "pixel", *args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("ditas sample: error:")
    assert list(tmp_path.iterdir()) == []


def test_missing_vae_and_bad_model(tmp_path, tiny_weights_path, capsys):
    out = tmp_path / "x.png"
    assert _run("--model", str(tiny_weights_path), "--out", str(out)) == 2
    assert "--vae" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"nope")
    assert _run("--model", str(junk), "--out", str(out)) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output(tmp_path, tiny_weights_path, capsys):
    assert _run("--model", str(tiny_weights_path), "--space", "pixel", "--out",
                str(tmp_path / "no" / "such" / "dir" / "x.png")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run("--model", str(tiny_weights_path), "--space", "pixel", "--out", str(tmp_path / "x.jpg")) == 2
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert _run("--model", str(tiny_weights_path), "--space", "pixel", "--out", str(ro / "x.png")) == 2


def test_console_script_exit_code(tmp_path, tiny_weights_path):
    proc = subprocess.run([sys.executable, "-m", "ditas.cli.main", "sample", "--model", str(tiny_weights_path),
                           "--classes", "99", "--space", "pixel", "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("ditas sample: error: class label 99 is out of range: "
                                                    "this model has classes 0..9")
    assert not (tmp_path / "x.png").exists()


def test_quantized_dit_folder_samples_with_quantized_as_with_model(tmp_path, capsys):
    """``--quantized DIR`` of a class-conditional DiT samples it as ``--model DIR`` does (it used to
    ask for a text prompt); with a ``--model`` beside it, a one-line error."""
    q = tmp_path / "q"
    assert main(["quantize", "--calib-steps", "2", "--calib-labels", "2", "--lora-rank", "4", "--lora-rounds", "1",
                 "--no-progress", "--out", str(q)]) == 0
    common = ["--classes", "1,7", "--steps", "4", "--seed", "3", "--no-progress"]
    assert _run("--model", str(q), *common, "--out", str(tmp_path / "a.png")) == 0
    assert _run("--quantized", str(q), *common, "--out", str(tmp_path / "b.png")) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    capsys.readouterr()
    assert _run("--quantized", str(q), "--model", str(q), *common, "--out", str(tmp_path / "c.png")) == 2
    err = capsys.readouterr().err
    assert "quantized class-conditional DiT" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.png").exists()
