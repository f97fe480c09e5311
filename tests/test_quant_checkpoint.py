"""Quantized model folders: bit-exact save/load, no float weights for quantized layers, atomicity."""

from __future__ import annotations

import json

import pytest
import torch

import ditas
from ditas.errors import CheckpointError
from ditas.quantization import checkpoint as ckpt
from ditas.quantization.apply import quantize
from ditas.quantization.linear import QuantLinear
from ditas.quantization.recipes import recipe_config
from ditas.quantization.weight_only import WeightOnlyInt8Linear
from quant_helpers import needs_int_kernel, random_dit

pytestmark = pytest.mark.exactness


@pytest.fixture(scope="module")
def quantized():
    m = random_dit(3, depth=2)
    cfg = recipe_config("ditas", w_bits=3, steps=2, calib_labels=2, lora_rank=4, lora_rounds=2,
                        alpha_grid=(0.25, 0.75), lora_dtype="float32")  # the tests below round to bf16 themselves
    q, report = quantize(m, cfg, progress=False, kernel="simulated")  # as the loads below
    return q, cfg, report


def test_save_load_is_bit_exact(tmp_path, quantized):
    q, cfg, report = quantized
    out = ckpt.save_quantized(q, tmp_path / "q", cfg, report)
    data = json.loads((out / "config.json").read_text())
    assert data["quantization"]["recipe"] == "ditas" and data["quantization"]["bits"] == {"weights": 3, "activations": 8}
    assert data["model"]["depth"] == 2 and (out / "report.json").exists()
    loaded = ditas.load_dit(out, kernel="simulated")
    a, b = q.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for name in ckpt.quant_layers(q):
        m = loaded.get_submodule(name)
        assert isinstance(m, QuantLinear) and not hasattr(m, "weight")
    adaln = data["quantization"]["weight_only_layers"]
    assert sorted(adaln) == ["blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1",
                             "final_layer.adaLN_modulation.1"]
    for name in adaln:
        m = loaded.get_submodule(name)
        assert isinstance(m, WeightOnlyInt8Linear) and m.qweight.dtype == torch.int8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(q(x, t, y), loaded(x, t, y))


def test_zero_points_are_stored_as_uint8_and_read_back_exactly(tmp_path, quantized):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    q, cfg, _ = quantized
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".wzero")}
    assert len(stored) == len(ckpt.quant_layers(q)) and all(t.dtype == torch.uint8 for t in stored.values())
    loaded = ditas.load_dit(out, kernel="simulated")
    for name, m in ckpt.quant_layers(q).items():
        back = loaded.get_submodule(name).wzero
        assert back.dtype == torch.float32 and torch.equal(back, m.wzero)
    # a zero point that is not an exact small integer keeps its float storage (nothing is rounded)
    import copy

    edited = copy.deepcopy(q)  # the fixture is shared
    m = edited.blocks[0].attn.qkv
    m.wzero[0, 0] = 2.5
    m.invalidate()
    assert ckpt._compact_zero_points(m.wzero).dtype == torch.float32
    out2 = ckpt.save_quantized(edited, tmp_path / "q2", cfg)
    assert load_file(str(out2 / "model.safetensors"))["blocks.0.attn.qkv.wzero"][0, 0] == 2.5
    # a format-2 file (float32 zero points) still loads
    state = load_file(str(out / "model.safetensors"))
    save_file({k: (v.float() if k.endswith(".wzero") else v) for k, v in state.items()}, str(out / "model.safetensors"))
    data = json.loads((out / "config.json").read_text())
    data["quantization"]["format_version"] = 2
    (out / "config.json").write_text(json.dumps(data))
    again = ditas.load_dit(out, kernel="simulated")
    assert torch.equal(again.blocks[1].mlp.fc2.wzero, loaded.blocks[1].mlp.fc2.wzero)


def test_qweight_is_packed(tmp_path, quantized):
    from safetensors import safe_open

    q, cfg, _ = quantized
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    data = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        qw = f.get_tensor("blocks.0.mlp.fc1.qweight")
    assert data["quantization"]["qweight_packing"] == "packed"
    assert qw.ndim == 1 and qw.numel() == (q.blocks[0].mlp.fc1.qweight.numel() * 3 + 7) // 8  # 3-bit codes
    data["quantization"]["qweight_packing"] = "none"  # unpacked codes: a format ditas never wrote
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="qweight_packing is 'none'"):
        ditas.load_dit(out)


def test_interrupted_save_leaves_no_folder(tmp_path, quantized, monkeypatch):
    import safetensors.torch

    q, cfg, _ = quantized

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_quantized(q, tmp_path / "q", cfg)
    assert list(tmp_path.iterdir()) == []


def test_bad_folders_are_clear_errors(tmp_path, quantized):
    q, cfg, _ = quantized
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    data = json.loads((out / "config.json").read_text())
    data["quantization"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="format version"):
        ditas.load_dit(out)
    data["quantization"]["format_version"] = 1
    data["model"]["hidden_size"] = 128
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError):
        ditas.load_dit(out)
    with pytest.raises(CheckpointError, match="no quantized layers"):
        ckpt.save_quantized(random_dit(0, depth=1), tmp_path / "f", cfg)


def _lora_bytes(folder) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys() if ".lora_" in k}


def test_bf16_lora_factors_round_trip_and_halve_their_bytes(tmp_path, quantized):
    import copy

    q, cfg, _ = quantized
    q16 = copy.deepcopy(q)
    for m in ckpt.quant_layers(q16).values():
        m.set_lora_dtype(torch.bfloat16)
    m32, m16 = q.blocks[0].attn.qkv, q16.blocks[0].attn.qkv
    assert m16.lora_down.dtype == torch.bfloat16 and "(bf16)" in repr(m16)
    assert torch.equal(m16.lora_down.float(), m32.lora_down.to(torch.bfloat16).float())  # rounded once
    out32 = ckpt.save_quantized(q, tmp_path / "q32", cfg)
    out16 = ckpt.save_quantized(q16, tmp_path / "q16", cfg)
    meta = json.loads((out16 / "config.json").read_text())["quantization"]
    assert meta["format_version"] == ckpt.FORMAT_VERSION == 5
    assert {e["lora_dtype"] for e in meta["layers"].values()} == {"bfloat16"}
    b32, b16 = _lora_bytes(out32), _lora_bytes(out16)
    assert b32.keys() == b16.keys() and sum(b16.values()) * 2 == sum(b32.values()) > 0
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([3, 400, 999]), torch.tensor([0, 5, 9])
    for kernel in ("simulated", "auto"):
        loaded = ditas.load_dit(out16, kernel=kernel)
        a, b = q16.state_dict(), loaded.state_dict()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        with torch.no_grad():
            want = q16(x, t, y)  # simulated
            got = loaded(x, t, y)
            if kernel == "simulated":
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_format_1_folders_read_as_float32_lora_and_bad_dtypes_are_refused(tmp_path, quantized):
    q, cfg, _ = quantized
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    data = json.loads((out / "config.json").read_text())
    data["quantization"]["format_version"] = 1  # version 1 entries have no lora_dtype: float32
    for entry in data["quantization"]["layers"].values():
        del entry["lora_dtype"]
    (out / "config.json").write_text(json.dumps(data))
    loaded = ditas.load_dit(out, kernel="simulated")
    assert loaded.blocks[0].mlp.fc1.lora_dtype == torch.float32
    assert torch.equal(loaded.blocks[0].mlp.fc1.lora_up, q.blocks[0].mlp.fc1.lora_up)
    data["quantization"]["format_version"] = 2
    next(iter(data["quantization"]["layers"].values()))["lora_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="lora_dtype = 'float16'"):
        ditas.load_dit(out)


@needs_int_kernel
def test_int_backend_agrees_with_the_simulated_path(tmp_path, quantized):
    q, cfg, _ = quantized
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    fake, real = ditas.load_dit(out, kernel="simulated"), ditas.load_dit(out, kernel="auto")
    assert real.blocks[0].mlp.fc1.kernel in ("onednn", "int_mm")
    assert fake.blocks[0].mlp.fc1.kernel == "simulated"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t, y = torch.tensor([3, 400, 999]), torch.tensor([0, 5, 9])
    with torch.no_grad():
        torch.testing.assert_close(real(x, t, y), fake(x, t, y), rtol=1e-4, atol=1e-5)


def test_adaln_float_option_keeps_float_adaln_and_int8_stays_close(tmp_path):
    """``adaln="float"`` leaves the adaLN linears alone; the int8 model computes nearly the same."""
    m = random_dit(5, depth=2)
    common = dict(w_bits=4, steps=2, calib_labels=2, lora_rank=4, lora_rounds=2, alpha_grid=(0.25, 0.75))
    q8, _ = quantize(m, recipe_config("ditas", **common), progress=False, kernel="simulated")
    qf, _ = quantize(m, recipe_config("ditas_fp_adaln", **common), progress=False, kernel="simulated")
    assert isinstance(q8.blocks[1].adaLN_modulation[1], WeightOnlyInt8Linear)
    assert type(qf.blocks[1].adaLN_modulation[1]) is torch.nn.Linear
    out = ckpt.save_quantized(qf, tmp_path / "qf")
    assert json.loads((out / "config.json").read_text())["quantization"]["weight_only_layers"] == {}
    loaded = ditas.load_dit(out, kernel="simulated")
    assert type(loaded.final_layer.adaLN_modulation[1]) is torch.nn.Linear
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t, y = torch.tensor([1, 250, 600, 999]), torch.tensor([0, 3, 6, 9])
    with torch.no_grad():
        a, b = q8(x, t, y), qf(x, t, y)
        assert torch.equal(qf(x, t, y), loaded(x, t, y))
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < 2e-2, rel


def test_the_layer_schema_drives_save_validate_and_load(tmp_path, quantized):
    """One table says what a saved layer holds: save writes exactly its fields and tensors, the
    layer table is checked against it, and load refuses a folder lacking a tensor it calls for."""
    from safetensors.torch import load_file, save_file

    from ditas.quantization import layer_schema as schema

    q, cfg, _ = quantized
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    data = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    for name, meta in data["quantization"]["layers"].items():
        assert set(meta) == {f.name for f in schema.LAYER_META}
        held = sorted(k[len(name) + 1:] for k in state if k.startswith(name + ".") and "." not in k[len(name) + 1:])
        assert held == sorted(schema.expected_tensor_names(meta))
    # a field out of the schema's range is refused, naming it
    bad = json.loads(json.dumps(data))
    bad["quantization"]["layers"]["blocks.0.mlp.fc1"]["act_granularity"] = "channel"
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="blocks.0.mlp.fc1 has act_granularity = 'channel', expected one of"):
        ditas.load_dit(out, kernel="simulated")
    (out / "config.json").write_text(json.dumps(data))
    # a saved layer missing a schema tensor is refused, naming it
    save_file({k: v for k, v in state.items() if k != "blocks.1.attn.proj.lora_up"}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks.1.attn.proj lacks its tensor 'lora_up'"):
        ditas.load_dit(out, kernel="simulated")


def test_a_flat_config_of_an_older_folder_reads_as_the_nested_one(tmp_path, quantized):
    """The one reading path for flat names: a folder whose config.json holds the flat form loads
    with the same config as the nested form."""
    from ditas.quantization.config import FLAT_NAMES

    q, cfg, _ = quantized
    out = ckpt.save_quantized(q, tmp_path / "q", cfg)
    data = json.loads((out / "config.json").read_text())
    flat = {"recipe": cfg.recipe, "adaln": cfg.adaln}
    for name, (spec, field) in FLAT_NAMES.items():
        value = getattr(getattr(cfg, spec), field)
        flat[name] = list(value) if isinstance(value, tuple) else value
    data["quantization"]["config"] = flat
    (out / "config.json").write_text(json.dumps(data))
    assert ditas.load_dit(out, kernel="simulated").quant_config == cfg
