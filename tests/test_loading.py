"""load_dit on every accepted format, and clear errors on everything else."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ditas
from conftest import rel_err
from ditas.errors import CheckpointError
from ditas.model.dit import DiT, DiTConfig


@pytest.fixture(scope="module")
def tiny_state(tiny_weights_path):
    return load_file(str(tiny_weights_path))


def _same_function(a, b):
    torch.manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        return rel_err(a(x, t, y), b(x, t, y)) < 1e-6


@pytest.mark.parametrize("wrap", [None, "model", "ema", "state_dict"])
def test_pt_checkpoints(tmp_path, tiny_state, tiny_model, tiny_config, wrap):
    path = tmp_path / "ckpt.pt"
    torch.save(tiny_state if wrap is None else {wrap: tiny_state, "step": torch.tensor(3)}, path)
    m = ditas.load_dit(path, config=DiTConfig(**tiny_config))
    assert not m.training and _same_function(m, tiny_model)


def test_config_inferred_from_shapes(tmp_path, tiny_state):
    path = tmp_path / "ckpt.pt"
    torch.save(tiny_state, path)
    cfg = ditas.load_dit(path).config
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.input_size, cfg.num_classes,
            cfg.learn_sigma) == (2, 64, 2, 4, 8, 10, True)


def test_published_xl_layout_inferred(tmp_path):
    cfg = ditas.dit_config("DiT-XL/2", input_size=4)  # small latent keeps the test light
    with torch.device("meta"):
        model = DiT(cfg)
    from ditas.model.loading import infer_config

    inferred = infer_config({k: v for k, v in model.state_dict().items()})
    assert inferred.num_heads == 16 and inferred.depth == 28 and inferred.hidden_size == 1152


def test_folder_round_trip(tmp_path, tiny_model):
    folder = ditas.save_dit(tiny_model, tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["model"]["depth"] == 2
    assert _same_function(ditas.load_dit(folder), tiny_model)


def test_diffusers_folder_matches_diffusers(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in ref.parameters():  # adaLN-Zero starts at zero: perturb so every path matters
            p.add_(torch.randn_like(p) * 0.05)
        emb0 = ref.transformer_blocks[0].norm1.emb.state_dict()
        for block in ref.transformer_blocks[1:]:  # a converted DiT shares one embedder
            block.norm1.emb.load_state_dict(emb0)
    ref.eval()
    pipe = tmp_path / "pipe"
    ref.save_pretrained(pipe / "transformer")  # DiTPipeline layout
    ours = ditas.load_dit(pipe)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([2, 7, 10])
    with torch.no_grad():
        assert rel_err(ours(x, t, y), ref(x, timestep=t, class_labels=y).sample) < 1e-5


def test_diffusers_unshared_embedders_rejected(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    ref.save_pretrained(tmp_path / "d")
    with pytest.raises(CheckpointError, match="own .*embedder"):
        ditas.load_dit(tmp_path / "d")


def test_errors_name_the_file(tmp_path, tiny_state):
    with pytest.raises(CheckpointError, match="no such file"):
        ditas.load_dit(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        ditas.load_dit(bad)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="trunc.pt"):
        ditas.load_dit(trunc)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(CheckpointError, match="not a DiT state dict"):
        ditas.load_dit(other)
    extra = tmp_path / "extra.safetensors"
    save_file({**tiny_state, "blocks.0.attn.lora.weight": torch.zeros(2)}, str(extra))
    with pytest.raises(CheckpointError, match="unknown keys"):
        ditas.load_dit(extra)
    wrong = tmp_path / "wrong.safetensors"
    broken = dict(tiny_state)
    broken["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    save_file(broken, str(wrong))
    with pytest.raises(CheckpointError, match="shape mismatch at blocks.1.mlp.fc2.weight"):
        ditas.load_dit(wrong)
    txt = tmp_path / "model.txt"
    txt.write_text("hi")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        ditas.load_dit(txt)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        ditas.load_dit(tmp_path / "empty_dir")


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        ditas.load_dit(path)
