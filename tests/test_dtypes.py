"""Any compute dtype: quantized models in fp32, bf16 and fp16 (tiny DiT, PixArt, SD3, Flux).

The quantized layers take and return the model's dtype and compute in fp32 inside; ``.to(dtype)``
casts the float model and never the integer codes, scales or LoRA factors; a folder loads in the
dtype asked for, bit-equal to the quantized model in memory; ``--dtype`` on the command line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import ditas
from ditas.calibration.recording import record_calibration
from ditas.cli.main import main
from ditas.errors import ConfigError
from ditas.quantization.kernels import use_kernels
from ditas.quantization.linear import QuantLinear
from ditas.quantization.weight_only import WeightOnlyInt8Linear
import family_models as fm
from quant_helpers import random_dit

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FAMILIES = ("dit", "pixart", "sd3", "flux")
SMALL = dict(lora_rank=4, lora_rounds=2)
# relative error of W4A8 vs the FP model of the same dtype: measured 0.01-0.2 on these random models
MAX_REL = 0.35


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cast(kwargs: dict, dtype: torch.dtype) -> dict:
    """A call's float inputs in ``dtype`` (Flux's position ids stay fp32, as its pipeline passes them)."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and not k.endswith("_ids")
            else v for k, v in kwargs.items()}


def _build(family: str, dtype: torch.dtype):
    if family == "dit":
        return random_dit(0, hidden=32, heads=2, depth=2).to(dtype)
    return fm.FAMILIES[family]().to(dtype)


def _call(model, family: str, dtype: torch.dtype, seed: int = 7, step: int = 0):
    """The model's output for one batch of inputs in ``dtype``."""
    with torch.no_grad():
        if family == "dit":
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(3, 1, 8, 8, generator=g).to(dtype)
            return model(x, torch.randint(0, 1000, (3,), generator=g), torch.randint(0, 10, (3,), generator=g))
        return model(**_cast(fm.call_kwargs(model, seed=seed, step=step), dtype))[0]


def _quantize(model, family: str, dtype: torch.dtype, **overrides):
    """quantize_ with a recorded calibration run (DiT: its own sampling run)."""
    if family == "dit":
        cfg = ditas.recipe_config("ditas", steps=2, calib_labels=2, alpha_grid=(0.3, 0.7), **SMALL, **overrides)
        return ditas.quantize_(model, cfg)
    with torch.no_grad(), record_calibration(model) as calib:
        for step in range(3):
            _call(model, family, dtype, seed=1, step=step)
    return ditas.quantize_(model, ditas.recipe_config("ditas", **SMALL, **overrides), calib)


@pytest.fixture(scope="module")
def quantized():
    """(family, dtype) -> (FP model, quantized model), built once for the module."""
    cache = {}

    def get(family, dtype):
        if (family, dtype) not in cache:
            fp = _build(family, dtype)
            q = copy.deepcopy(fp)
            _quantize(q, family, dtype)
            cache[family, dtype] = fp, q
        return cache[family, dtype]

    return get


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_model_computes_in_the_model_dtype(quantized, family, dtype):
    fp, q = quantized(family, dtype)
    out, ref = _call(q, family, dtype), _call(fp, family, dtype)
    assert out.dtype == dtype and ref.dtype == dtype
    assert torch.isfinite(out).all()
    assert 0 < _rel(out, ref) < MAX_REL
    layer = next(m for m in q.modules() if isinstance(m, QuantLinear))
    assert layer.wscale.dtype == torch.float32 and layer.qweight.dtype == torch.uint8  # stored as declared


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bfloat16", "float16"))
def test_integer_kernels_agree_with_the_simulated_kernel_within_rounding(quantized, dtype):
    _, q = quantized("pixart", dtype)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    g = torch.Generator().manual_seed(3)
    eps = torch.finfo(dtype).eps
    for layer in layers[:6]:
        x = (torch.randn(5, layer.in_features, generator=g) * 2).to(dtype)
        outs = {}
        for kernel in ("simulated", "int_mm", "onednn"):
            if ditas.quantization.kernels.KERNELS[kernel].supports(layer) is None:
                layer.set_kernel(kernel)
                with torch.no_grad():
                    outs[kernel] = layer(x)
        ref = outs.pop("simulated")
        assert outs, "no integer kernel ran"
        for kernel, y in outs.items():
            assert y.dtype == dtype
            # both compute in fp32 from the same codes; one rounding to the output dtype apart
            assert ((y.float() - ref.float()).abs() <= 2 * eps * ref.float().abs() + 1e-4).all(), kernel
    use_kernels(q)


def test_to_dtype_casts_the_float_model_and_never_the_quantized_tensors():
    fp = _build("pixart", torch.float32)
    q = copy.deepcopy(fp)
    _quantize(q, "pixart", torch.float32, lora_dtype="float32")
    layers = {n: m for n, m in q.named_modules() if isinstance(m, (QuantLinear, WeightOnlyInt8Linear))}
    before = {f"{n}.{k}": v.clone() for n, m in layers.items() for k, v in m.state_dict().items()}
    codes = {n: m.kernel_state.codes() for n, m in layers.items() if isinstance(m, QuantLinear)}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.type(torch.float16),
                 lambda m: m.to("cpu", torch.bfloat16)):
        cast(q)
        assert q.pos_embed.proj.weight.dtype in (torch.bfloat16, torch.float16)  # the float model is cast
        after = {f"{n}.{k}": v for n, m in layers.items() for k, v in m.state_dict().items()}
        assert after.keys() == before.keys()
        for k, v in before.items():
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    dtype = torch.bfloat16
    q.to(dtype)
    out = _call(q, "pixart", dtype)  # the kernels prepare again from the same codes
    assert out.dtype == dtype and torch.isfinite(out).all()
    for n, c in codes.items():
        assert torch.equal(layers[n].kernel_state.codes(), c)
    assert _rel(out, _call(fp.to(dtype), "pixart", dtype)) < MAX_REL
    q.float()
    assert q.pos_embed.proj.weight.dtype == torch.float32


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_a_bf16_model_saved_loads_bit_equal_in_bf16(tmp_path, quantized, family):
    dtype = torch.bfloat16
    _, q = quantized(family, dtype)
    ditas.save_quantized(q, tmp_path / "q")
    back = ditas.load_quantized(tmp_path / "q", dtype=dtype)
    assert torch.equal(_call(back, family, dtype), _call(q, family, dtype))
    as_saved = ditas.load_quantized(tmp_path / "q", dtype=None)  # None: the dtype it was saved in
    assert torch.equal(_call(as_saved, family, dtype), _call(q, family, dtype))
    fp32 = ditas.load_quantized(tmp_path / "q")  # float32 by default, as diffusers loads
    assert _call(fp32, family, torch.float32).dtype == torch.float32


def test_a_fp32_folder_loaded_in_bf16_equals_the_model_cast_in_memory(tmp_path, quantized):
    _, q = quantized("sd3", torch.float32)
    ditas.save_quantized(q, tmp_path / "q")
    cast = copy.deepcopy(q).to(torch.bfloat16)
    back = ditas.load_quantized(tmp_path / "q", dtype="bfloat16")
    assert torch.equal(_call(back, "sd3", torch.bfloat16), _call(cast, "sd3", torch.bfloat16))


def test_a_bad_dtype_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="not a compute dtype"):
        ditas.load_quantized(tmp_path, dtype="int8")
    with pytest.raises(ConfigError, match="not a compute dtype"):
        ditas.load_dit(dtype=torch.int32)


def test_load_dit_in_bf16():
    m = ditas.load_dit(dtype="bfloat16")
    assert m.x_embedder.proj.weight.dtype == torch.bfloat16


# -- the pipeline case -----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-pixart"
    fm.save_tiny_pixart_pipeline(path)
    return path


def _images(pipe, seed: int = 3) -> np.ndarray:
    from ditas.pipelines import generate_images

    return np.asarray(generate_images(pipe, ["a cat", "a red fox"], steps=2, seed=seed, progress=False)[1])


def test_a_bf16_pipeline_quantized_in_place_then_saved_and_loaded(tmp_path, pixart_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pixart_dir), torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    fp_images = _images(pipe)
    with ditas.record_calibration(pipe.transformer) as calib:
        pipe(["a red fox", "a blue house"], num_inference_steps=3, output_type="latent", use_resolution_binning=False,
             clean_caption=False, generator=torch.Generator().manual_seed(0))
    ditas.quantize_(pipe.transformer, ditas.recipe_config("ditas", **SMALL), calib)
    in_place = _images(pipe)
    assert not np.array_equal(in_place, fp_images)  # the quantized transformer ran
    ditas.save_quantized(pipe.transformer, tmp_path / "q")
    fresh = DiffusionPipeline.from_pretrained(str(pixart_dir), torch_dtype=torch.bfloat16,
                                              transformer=ditas.load_quantized(tmp_path / "q", dtype=torch.bfloat16))
    fresh.set_progress_bar_config(disable=True)
    assert np.array_equal(_images(fresh), in_place)


def test_cli_dtype_on_quantize_and_sample(tmp_path, pixart_dir):
    q = tmp_path / "q"
    args = ["--calib-steps", "2", "--calib-prompts", "2", "--calib-batch", "2", "--lora-rank", "4",
            "--lora-rounds", "2", "--no-progress"]
    assert main(["quantize", "--model", str(pixart_dir), "--out", str(q), "--dtype", "bfloat16", *args]) == 0
    from safetensors import safe_open

    with safe_open(str(q / "model.safetensors"), "pt") as f:
        assert f.get_tensor("pos_embed.proj.weight").dtype == torch.bfloat16  # calibrated in bf16
        assert f.get_tensor("transformer_blocks.0.attn1.to_q.wscale").dtype == torch.float32
    assert json.loads((q / "config.json").read_text())["family"] == "pixart"
    pngs = {}
    for dtype in ("bfloat16", "float32"):
        pngs[dtype] = tmp_path / f"{dtype}.png"
        assert main(["sample", "--quantized", str(q), "--prompt", "a cat", "--steps", "2", "--dtype", dtype,
                     "--out", str(pngs[dtype])]) == 0
    from PIL import Image

    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in pngs.values())
    assert a.shape == b.shape
    with pytest.raises(SystemExit) as exc:  # argparse's choices: a one-line usage error
        main(["sample", "--quantized", str(q), "--prompt", "a cat", "--dtype", "int8", "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
