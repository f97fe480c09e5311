"""No run ends in silent garbage, and bad input is a one-line error before the work: non-finite
weights, non-finite options, corrupted config files of every loader, and the traceback cases."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ditas
from ditas.cli.main import main
from ditas.errors import DitasError
from ditas.validate import FiniteGuard
from quant_helpers import random_dit


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return ditas.save_dit(random_dit(7, depth=2), tmp_path_factory.mktemp("f") / "float")


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory):
    from ditas.quantization.apply import quantize
    from ditas.quantization.checkpoint import save_quantized
    from ditas.quantization.recipes import recipe_config

    cfg = recipe_config("ditas", steps=2, calib_labels=1, lora_rank=2, lora_rounds=1, alpha_grid=(0.5,))
    q, _ = quantize(random_dit(8, depth=2), cfg, progress=False)
    return save_quantized(q, tmp_path_factory.mktemp("q") / "quant", cfg)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    emb0 = ref.transformer_blocks[0].norm1.emb.state_dict()
    for block in ref.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0)
    path = tmp_path_factory.mktemp("d") / "pipe"
    ref.save_pretrained(path / "transformer")
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config_file(folder: Path) -> Path:
    return folder / "config.json" if (folder / "config.json").exists() else folder / "transformer" / "config.json"


def _edit_config(folder: Path, edit) -> Path:
    f = _config_file(folder)
    data = json.loads(f.read_text())
    data = edit(data) or data
    f.write_text(json.dumps(data))
    return folder


def _edit_tensor(folder: Path, key: str, edit) -> Path:
    f = folder / "model.safetensors"
    state = load_file(str(f))
    state[key] = edit(state[key].clone())
    save_file(state, str(f), metadata={"format": "ditas-quantized"})
    return folder


def _one_line_load_error(folder, match: str) -> str:
    with pytest.raises(DitasError, match=match) as info:
        ditas.load_dit(folder, **({"kernel": "simulated"} if (Path(folder) / "config.json").exists() and
                                  "quantization" in (Path(folder) / "config.json").read_text() else {}))
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------
#                                     Non-finite weights
# ----------------------------------------------------------------------------------------------


def test_a_nan_weight_is_refused_at_load_naming_the_tensor(tmp_path, float_dir, capsys):
    folder = _copy(float_dir, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state["blocks.1.mlp.fc2.weight"][3, 4] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    _one_line_load_error(folder, r"blocks\.1\.mlp\.fc2\.weight holds 1 non-finite")
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(folder), "--num", "2", "--steps", "2", "--out", str(out)]) == 2
    assert "blocks.1.mlp.fc2.weight" in capsys.readouterr().err and not out.exists()
    single = tmp_path / "w.safetensors"  # a bare state dict, with an inf
    state["blocks.1.mlp.fc2.weight"][3, 4] = float("inf")
    save_file(state, str(single))
    _one_line_load_error(single, r"blocks\.1\.mlp\.fc2\.weight holds 1 non-finite value\(s\) \(first: inf\)")


@pytest.mark.parametrize("key, edit, match", [
    ("blocks.0.attn.qkv.wscale", lambda t: t.index_fill_(0, torch.tensor([2]), float("nan")), "non-finite"),
    ("blocks.0.attn.qkv.wscale", lambda t: t.index_fill_(0, torch.tensor([2]), 0.0), "scale.*<= 0"),
    ("blocks.0.mlp.fc1.qweight", lambda t: t[:-3], "blocks.0.mlp.fc1.qweight does not hold the 4-bit codes"),
    ("blocks.0.mlp.fc1.qweight", lambda t: t.reshape(2, -1), "qweight does not hold"),
    ("blocks.0.mlp.fc1.qweight", lambda t: t.float(), "qweight does not hold"),
    ("blocks.1.mlp.fc2.lora_up", lambda t: t.index_fill_(0, torch.tensor([0]), float("-inf")), "lora_up holds"),
])
def test_a_corrupt_quantized_tensor_is_one_line(tmp_path, quant_dir, key, edit, match):
    _one_line_load_error(_edit_tensor(_copy(quant_dir, tmp_path / "q"), key, edit), match)


def test_a_nan_prediction_stops_sampling_naming_step_and_layer(float_dir):
    from ditas.diffusion.batches import generate

    model = ditas.load_dit(float_dir)
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[0, 0] = float("nan")
    with pytest.raises(DitasError, match=r"step 1 of 3 .*layer blocks\.1\.attn\.proj"):
        generate(model, [1, 2], steps=3, cfg_scale=4.0, progress=False)


def test_the_guard_names_the_step_where_the_prediction_breaks(float_dir):
    model = ditas.load_dit(float_dir)
    calls = []

    def fn(x, t):
        calls.append(1)
        out = model(x, t, torch.zeros(len(x), dtype=torch.long))
        return out * float("inf") if len(calls) == 4 else out

    guard = FiniteGuard(model, fn, num_steps=9)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    for _ in range(3):
        guard(x, t)
    with pytest.raises(DitasError, match=r"step 4 of 9 \(model timestep 5\).*guidance combination"):
        guard(x, t)


# ----------------------------------------------------------------------------------------------
#                                 Options, checked before the work
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def no_model_load(monkeypatch):
    import ditas.loaders as loaders

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(loaders, "load_dit", refuse)


@pytest.mark.parametrize("argv, words", [
    (["--cfg-scale", "inf"], "--cfg-scale"), (["--cfg-scale", "1e30"], "--cfg-scale"),
    (["--cfg-scale", "nan"], "--cfg-scale"), (["--cfg-scale", "-1"], "--cfg-scale"),
    (["--sampler", "ddim", "--eta", "nan"], "--eta"), (["--sampler", "ddim", "--eta", "-5"], "--eta"),
    (["--steps", "5000"], "2..1000"), (["--seed", str(2 ** 70)], "--seed"), (["--seed", "-1"], "--seed"),
])
def test_bad_sampling_options_are_refused_before_loading(tmp_path, capsys, no_model_load, argv, words):
    out = tmp_path / "x.png"
    assert main(["sample", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--calib-cfg", "nan"], "calibration cfg scale"), (["--calib-cfg", "inf"], "calibration cfg scale"),
    (["--calib-steps", "5000"], "2..1000"), (["--calib-seed", str(2 ** 70)], "calibration seed"),
])
@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_bad_calibration_options_are_refused_before_loading(tmp_path, capsys, no_model_load, argv, words, command):
    out = tmp_path / "q"
    assert main([command, *argv, "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, words", [
    (["--cfg-scale", "nan"], "--cfg-scale"), (["--steps", "5000"], "2..1000"), (["--seed", str(2 ** 70)], "--seed"),
])
def test_bad_compare_sampling_options(tmp_path, capsys, no_model_load, argv, words):
    assert main(["compare", *argv, "--no-progress", "--out", str(tmp_path / "c")]) == 2
    assert words in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_sample_refuses_a_huge_png_grid_and_an_npz_larger_than_the_disk(tmp_path, float_dir, capsys):
    assert main(["sample", "--model", str(float_dir), "--num", "100000000", "--out", str(tmp_path / "x.png")]) == 2
    assert "at most 1024 images" in capsys.readouterr().err
    assert main(["sample", "--model", str(float_dir), "--num", "100000000000", "--out", str(tmp_path / "x.npz")]) == 2
    assert "GiB are free" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sample_no_progress_and_version(tmp_path, float_dir, capsys):
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(float_dir), "--num", "2", "--steps", "2", "--no-progress",
                 "--out", str(out)]) == 0
    assert "sampling" not in capsys.readouterr().err and out.exists()
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"ditas {ditas.__version__}"


@pytest.mark.parametrize("argv, words", [(["-k", "0"], "-k must be at least 1"), (["-k", "30"], "need more than 30")])
def test_eval_k_is_checked(tmp_path, capsys, argv, words):
    import numpy as np

    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((20, 32, 32, 3), dtype=np.uint8), labels=np.arange(20) % 10)
    assert main(["eval", str(npz), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_out_in_proc_is_refused_before_the_work(capsys, no_model_load):
    if not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    assert main(["sample", "--out", "/proc/x.png"]) == 2
    assert "does not accept new files" in capsys.readouterr().err


class NotATensor:
    pass


def test_the_pt_error_does_not_advise_the_unsafe_option(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"model": NotATensor(), "x": torch.zeros(1)}, path)
    msg = _one_line_load_error(path, "m.pt")
    assert "weights_only" not in msg and "False" not in msg and "NotATensor" in msg


# ----------------------------------------------------------------------------------------------
#                                     Corrupted config files
# ----------------------------------------------------------------------------------------------

def _set(path: tuple, value):
    def edit(data):
        d = data
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


def _drop(path: tuple):
    def edit(data):
        d = data
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return edit


LAYER = ("quantization", "layers", "blocks.0.mlp.fc1")


@pytest.mark.parametrize("kind, edit, match", [
    ("float", lambda d: [d], "must be an object, got list"),
    ("diffusers", lambda d: [d], "must be an object, got list"),
    ("float", _set(("model", "mlp_ratio"), -1), "mlp_ratio must be a number > 0"),
    ("float", _set(("model", "mlp_ratio"), "x"), "mlp_ratio must be a number"),
    ("float", _set(("model", "norm_eps"), "x"), "norm_eps must be a number"),
    ("float", _set(("model", "norm_eps"), -1), "norm_eps must be a number > 0"),
    ("float", _set(("model", "depth"), 100000), "depth must be an integer in 1..1024"),
    ("float", _set(("model", "depth"), 3), "depth 3, the weights hold 2 blocks"),
    ("diffusers", _set(("num_layers",), "abc"), "num_layers must be an integer, got 'abc'"),
    ("diffusers", _set(("num_attention_heads",), 0), "must be an integer in 1.."),
    ("diffusers", _set(("num_attention_heads",), None), "num_attention_heads must be an integer, got None"),
    ("diffusers", _set(("num_embeds_ada_norm",), "ten"), "num_embeds_ada_norm must be an integer, got 'ten'"),
    ("diffusers", _set(("sample_size",), 10 ** 12), "input_size must be an integer in"),
    ("quant", _drop(LAYER + ("in_features",)), "blocks.0.mlp.fc1 lacks 'in_features'"),
    ("quant", _set(("quantization", "layers"), ["blocks.0.mlp.fc1"]), "layers' must be a non-empty object"),
    ("quant", _set(LAYER + ("lora_rank",), -3), "lora_rank = -3"),
    ("quant", _set(LAYER + ("wbits",), 3), "blocks.0.mlp.fc1.qweight does not hold the 3-bit codes"),
    ("quant", _set(LAYER + ("in_features",), "64"), r"in_features = '64' \(str\)"),
    ("quant", _set(LAYER + ("in_features",), 65), "is 65->256 in the file but 64->256 in the model"),
    ("quant", _set(("model", "depth"), 3), "depth 3, the weights hold 2 blocks"),
])
def test_corrupted_configs_are_one_line_errors(tmp_path, float_dir, quant_dir, diffusers_dir, kind, edit, match):
    src = {"float": float_dir, "quant": quant_dir, "diffusers": diffusers_dir}[kind]
    _one_line_load_error(_edit_config(_copy(src, tmp_path / "m"), edit), match)


def _leaves(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield prefix + (k,)
            yield from _leaves(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield prefix + (i,)
            yield from _leaves(v, prefix + (i,))


def test_randomly_corrupted_configs_give_only_one_line_ditas_errors(tmp_path_factory, float_dir, quant_dir,
                                                                    diffusers_dir):
    """Any value of any key of config.json replaced by random JSON (or deleted), for each loader:
    the load either succeeds or raises a one-line DitasError; never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    sources = {"float": float_dir, "quant": quant_dir, "diffusers": diffusers_dir}
    paths = {k: list(_leaves(json.loads(_config_file(v).read_text()))) for k, v in sources.items()}
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, 1, -1, 2, 3]),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                         max_size=3), max_leaves=5)
    work = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(sorted(sources)), data=st.data(), delete=st.booleans(), value=values)
    def check(kind, data, delete, value):
        path = data.draw(st.sampled_from(paths[kind]))
        folder = work / "m"
        if folder.exists():
            shutil.rmtree(folder)
        _copy(sources[kind], folder)
        _edit_config(folder, _drop(path) if delete else _set(path, value))
        kwargs = {"kernel": "simulated"} if kind == "quant" else {}
        try:
            ditas.load_dit(folder, **kwargs)
        except DitasError as exc:
            assert "\n" not in str(exc), str(exc)

    check()


def test_config_json_with_nan_is_refused_on_write(tmp_path):
    m = random_dit(1, depth=1)
    with pytest.raises(DitasError, match="training.lr is not a finite number"):
        ditas.save_dit(m, tmp_path / "m", extra={"training": {"lr": math.nan}})
    assert list(tmp_path.iterdir()) == []


def test_a_nan_training_loss_is_a_one_line_error(tmp_path):
    from ditas.model.dit import DiTConfig
    from ditas.training import TrainConfig, train_dit

    model = DiTConfig(input_size=32, patch_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                      num_classes=10, learn_sigma=True)
    cfg = TrainConfig(model=model, steps=2, batch_size=4, warmup_steps=0, log_every=1, ckpt_every=1000, bf16=False)
    images = torch.zeros(8, 1, 32, 32)
    images[:, 0, 5, 5] = float("nan")  # a bad pixel in every training image
    with pytest.raises(DitasError, match=r"training loss became nan at step 1"):
        train_dit(cfg, images, torch.zeros(8, dtype=torch.long), tmp_path / "run", progress=False)


# ----------------------------------------------------------------------------------------------
#                 Scales and zero points that would give garbage on some kernel
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor, value, match", [
    ("wzero", 1e30, r"layer blocks\.0\.attn\.qkv: tensor blocks\.0\.attn\.qkv\.wzero holds zero point"),
    ("wscale", 1e38, r"layer blocks\.0\.attn\.qkv: tensor blocks\.0\.attn\.qkv\.wscale holds scale.*overflow"),
    ("wzero", 2.5, r"blocks\.0\.attn\.qkv\.wzero holds zero point\(s\) that are not integers"),
])
def test_scales_and_zero_points_are_refused_on_every_kernel(tmp_path, quant_dir, tensor, value, match, capsys):
    import re

    from ditas.cli.main import main
    from ditas.quantization.kernels import kernel_names

    folder = _edit_tensor(_copy(quant_dir, tmp_path / "q"), f"blocks.0.attn.qkv.{tensor}",
                          lambda t: t.float().index_fill_(0, torch.tensor([1]), value))
    for kernel in kernel_names():  # refused at load whichever kernel would run it
        with pytest.raises(DitasError, match=match) as info:
            ditas.load_quantized(folder, kernel=kernel)
        assert "\n" not in str(info.value)
        out = tmp_path / f"{kernel}.png"
        assert main(["sample", "--model", str(folder), "--kernel", kernel, "--num", "1", "--steps", "2",
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err) and len(err.strip().splitlines()) == 1 and not out.exists()
