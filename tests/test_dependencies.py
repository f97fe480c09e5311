"""What ditas asks of its environment: ranges in pyproject, exact versions in constraints.txt,
the VAE's own latent scale, no accelerate warning."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ditas.diffusion.images import VAE_SCALE, decode_to_uint8, vae_scaling_factor

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_asks_ranges_and_constraints_pin_them():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if "==" in d], deps  # ranges only: installs beside the user's torch
    assert not [d for d in deps if d.startswith("mlxtend")]
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    for d in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", d).group(0)
        assert name in pins, f"{name} has no exact version in constraints.txt"
    assert pins["torch"] == torch.__version__.split("+")[0]  # the torch the tests run on
    assert "-c constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()


def test_latent_scale_comes_from_the_vae_config():
    seen = []

    class FakeVAE:
        config = SimpleNamespace(scaling_factor=0.5)

        def decode(self, z):
            seen.append(z)
            return SimpleNamespace(sample=torch.zeros(len(z), 3, 4, 4))

    model = SimpleNamespace(config=SimpleNamespace(space="latent"))
    z = torch.ones(2, 4, 2, 2)
    decode_to_uint8(model, z, FakeVAE())
    assert torch.equal(seen[0], z / 0.5)
    assert vae_scaling_factor(SimpleNamespace(config=SimpleNamespace())) == VAE_SCALE


def test_vae_loads_without_the_accelerate_warning(tmp_path, capfd):
    diffusers = pytest.importorskip("diffusers")
    from ditas.model.vae import load_vae

    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4, layers_per_block=1, scaling_factor=0.3)
    vae.save_pretrained(tmp_path / "vae")
    capfd.readouterr()
    loaded = load_vae(tmp_path / "vae")
    assert vae_scaling_factor(loaded) == pytest.approx(0.3)
    assert "accelerate" not in capfd.readouterr().err
    assert np.isfinite(float(next(loaded.parameters()).sum()))
