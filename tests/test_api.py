"""The torchao-style API exported from ``ditas``, on ditas' own DiT."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ditas
from ditas.calibration.trajectory import record_trajectory
from ditas.errors import CalibrationError, CheckpointError, ConfigError
from ditas.quantization.apply import calibrate
from ditas.quantization.smoothing import fold_into_modulation_table
from quant_helpers import fold_smoothing_in_float, random_dit


def _inputs(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_quantize_save_load_without_calib_is_bit_exact(tmp_path):
    m = random_dit(0, hidden=32, heads=2, depth=2)
    fp = copy.deepcopy(m)
    report = ditas.quantize_(m, ditas.recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4, lora_rounds=2,
                                                    alpha_grid=(0.3, 0.7)))
    assert report["num_layers"] == 8 and report["recipe"] == "ditas"
    x, t, y = _inputs()
    with torch.no_grad():
        out = m(x, t, y)
        assert 0 < _rel(out, fp(x, t, y)) < 0.5
    ditas.save_quantized(m, tmp_path / "q")
    back = ditas.load_quantized(tmp_path / "q", device="cpu")  # the same (default) kernels as quantize_
    with torch.no_grad():
        assert torch.equal(back(x, t, y), out)


def test_save_of_a_float_model_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not quantized"):
        ditas.save_quantized(random_dit(0, depth=1), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_quantize_takes_a_recipe_name_and_rejects_other_configs():
    m = random_dit(1, hidden=32, heads=2, depth=1)
    with pytest.raises(ConfigError, match="QuantConfig or a recipe name"):
        ditas.quantize_(m, {"w_bits": 4})
    with pytest.raises(ConfigError, match="unknown recipe"):
        ditas.quantize_(m, "gptq")


def test_record_calibration_around_ditas_own_sampler_equals_the_self_calibration():
    m = random_dit(2, hidden=32, heads=2, depth=2)
    cfg = ditas.recipe_config("tas_search", steps=3, calib_labels=2, search_tokens=None)
    labels = cfg.labels_for(m.num_classes)
    with ditas.record_calibration(m) as calib:
        own = record_trajectory(m, labels, cfg.calibration.steps, cfg.calibration.cfg_scale, cfg.calibration.sampler, cfg.calibration.seed,
                                first_block=m.blocks[0], progress=False)
    assert calib.steps == own.steps == 3  # (ditas' guided sampler calls forward directly: no model call hook)
    for a, b in zip(calib.calls, own.calls):
        assert all(torch.equal(u, v) for u, v in zip(a.args, b.args))
    recorded = calibrate(m, cfg, calib, progress=False)
    sampled = calibrate(m, cfg, progress=False)
    assert {n: r.alpha for n, r in recorded.layers.items()} == {n: r.alpha for n, r in sampled.layers.items()}


def test_empty_record_is_a_clear_error():
    m = random_dit(3, hidden=32, heads=2, depth=1)
    with ditas.record_calibration(m) as calib:
        pass
    with pytest.raises(CalibrationError, match="no calls"):
        ditas.quantize_(m, "rtn", calib)


@pytest.mark.parametrize("seed", [0, 1])
def test_dit_folds_leave_the_float_function_unchanged(seed):
    """adaLN rows (qkv, fc1), V rows (proj), on the fly (fc2), weights kept float: within 1e-5."""
    m = random_dit(seed, depth=2)
    cal = calibrate(m, ditas.recipe_config("tas", a_bits=16, steps=3, calib_labels=2), progress=False)
    assert {f.kind for f in cal.folds.values()} == {"adaln_rows", "prev_rows", "on_the_fly"}
    folded = fold_smoothing_in_float(copy.deepcopy(m), cal)
    x, t, y = _inputs(seed)
    with torch.no_grad():
        assert _rel(folded(x, t, y), m(x, t, y)) < 1e-5


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(2, 6))
def test_table_fold_is_exact(seed, width_mult, num_chunks):
    """A modulation table ``(num_chunks, D)``: LN(x) * (1 + sc) + sh, divided by s through the table."""
    g = torch.Generator().manual_seed(seed)
    d = 4 * width_mult
    table = torch.randn(num_chunks, d, generator=g, dtype=torch.float64)
    sh, sc = 0, num_chunks - 1
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    s = torch.rand(d, generator=g, dtype=torch.float64) * 4 + 0.05
    before = x * (1 + table[sc]) + table[sh]
    fold_into_modulation_table(table, s, sh, sc)
    after = x * (1 + table[sc]) + table[sh]
    torch.testing.assert_close(after, before / s, rtol=1e-12, atol=1e-12)


def test_quantize_runs_the_kernels_that_sample_runs_on_the_saved_folder(tmp_path, monkeypatch):
    """One default (auto): a model quantized in memory computes with the kernels ``ditas sample``
    gives its saved folder, so the two agree bit for bit."""
    import ditas.loaders as loading
    from ditas.cli.main import main
    from ditas.quantization.kernels import KERNELS
    from ditas.quantization.linear import QuantLinear

    m = random_dit(4, hidden=32, heads=2, depth=1)
    ditas.quantize_(m, ditas.recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4, lora_rounds=2,
                                           alpha_grid=(0.5,)))  # the "ditas" recipe, small: default kernel
    ditas.save_quantized(m, tmp_path / "q")
    loaded = []
    real_load = loading.load_dit
    monkeypatch.setattr(loading, "load_dit", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    assert main(["sample", "--model", str(tmp_path / "q"), "--num", "1", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "x.png")]) == 0
    sampled = loaded[0]

    def kernels(model):
        return {n: mod.kernel for n, mod in model.named_modules() if isinstance(mod, QuantLinear)}

    assert kernels(m) == kernels(sampled) and len(kernels(m)) == 4
    assert all(KERNELS[k].holds_codes for k in kernels(m).values())  # auto on the CPU: an integer kernel
    x, t, y = _inputs(5)
    with torch.no_grad():
        assert torch.equal(m(x, t, y), sampled(x, t, y))


def test_sample_returns_the_images_the_npz_holds_whatever_the_batch_size(tmp_path):
    """ditas.sample: the same bytes in memory and in the npz, for batch sizes 3 and 5 (the
    default model is float: no per-batch activation scales)."""
    import numpy as np

    model = ditas.load_dit()
    labels = [3, 1, 4, 1, 5, 9, 2]
    images = ditas.sample(model, labels, steps=2, seed=5, batch_size=3)
    assert images.dtype == np.uint8 and images.shape[0] == len(labels) and images.shape[-1] == 3
    assert np.array_equal(ditas.sample(model, labels, steps=2, seed=5, batch_size=5), images)
    path = ditas.sample(model, labels, steps=2, seed=5, batch_size=5, out=tmp_path / "x.npz")
    with np.load(path) as z:
        assert np.array_equal(z["arr_0"], images) and z["labels"].tolist() == labels
    assert not np.array_equal(ditas.sample(model, labels, steps=2, seed=6, batch_size=3), images)


def test_shares_give_every_index_to_exactly_one_process():
    from ditas.diffusion.batches import batch_ranges, shares

    for n, size, world in ((10, 3, 1), (10, 3, 2), (7, 2, 3), (4, 8, 3)):
        got = sorted(i for r in range(world) for a, b in shares(n, size, r, world) for i in range(a, b))
        assert got == list(range(n))
    assert shares(10, 3, 1, 2) == [(3, 6), (9, 10)]
    assert batch_ranges(5, 12, 3) == [(5, 8), (8, 11), (11, 12)]
