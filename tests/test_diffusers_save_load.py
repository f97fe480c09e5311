"""diffusers' own save and load of a ditas-quantized transformer (``quant_method: "ditas"``):
``pipe.save_pretrained`` -> ``DiffusionPipeline.from_pretrained`` and
``<TransformerClass>.from_pretrained`` give the quantized model back, bit-equal (same run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ditas
import family_models as fm
from ditas.errors import CheckpointError
from ditas.quantization.linear import QuantLinear
from quant_helpers import tiny_diffusers_dit

pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline  # noqa: E402

SAVERS = {"pixart": fm.save_tiny_pixart_pipeline, "sd3": fm.save_tiny_sd3_pipeline, "flux": fm.save_tiny_flux_pipeline}
# the tiny SD3 pipeline has no T5 (text_encoder_3), which diffusers must be told when loading it
LOAD_KWARGS = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}}
SMALL = ditas.recipe_config("ditas", lora_rank=4, lora_rounds=2)


def _outputs(model, seed: int = 7, steps: int = 2) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**fm.call_kwargs(model, seed=seed, step=s))[0] for s in range(steps)]


def _dit_outputs(model) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    with torch.no_grad():
        return [model(x, timestep=torch.tensor([t, t]), class_labels=y).sample for t in (900, 100)]


def _dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline

    return DiTPipeline(transformer=tiny_diffusers_dit(0), vae=fm._vae(4), scheduler=DDIMScheduler())


def _sample(pipe, family: str) -> np.ndarray:
    from ditas.pipelines import generate_images

    if family == "dit":
        # guidance 1: DiTPipeline hard-codes the null label 1000, beyond the tiny model's 10 classes
        out = pipe(class_labels=[1, 7], num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                   output_type="np").images
        return np.asarray(out)
    return np.asarray(generate_images(pipe, "a red fox", steps=2, seed=3, progress=False)[0])


@pytest.fixture(scope="module", params=[*SAVERS, "dit"])
def saved(request, tmp_path_factory):
    """(family, in-memory quantized pipeline, folder written by its save_pretrained)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    if family == "dit":
        pipe = _dit_pipeline()
        ditas.quantize_(pipe.transformer, ditas.recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4,
                                                              lora_rounds=2))
    else:
        SAVERS[family](root / "fp")
        pipe = DiffusionPipeline.from_pretrained(root / "fp", **LOAD_KWARGS.get(family, {}))
        t = pipe.transformer
        with torch.no_grad(), ditas.record_calibration(t) as calib:
            for step in range(3):
                t(**fm.call_kwargs(t, seed=1, step=step))
        ditas.quantize_(t, SMALL, calib)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "q")
    return family, pipe, root / "q"


def _same(family, a, b) -> bool:
    outs = _dit_outputs if family == "dit" else _outputs
    return all(torch.equal(x, y) for x, y in zip(outs(a), outs(b)))


def test_the_saved_config_names_ditas(saved):
    family, pipe, folder = saved
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "ditas"
    assert cfg["quantization_config"]["family"] == pipe.transformer.quant_family
    assert set(cfg["quantization_config"]["quantization"]["layers"]) == \
        {n for n, m in pipe.transformer.named_modules() if isinstance(m, QuantLinear)}


def test_diffusion_pipeline_from_pretrained_is_quantized_and_bit_equal(saved):
    family, pipe, folder = saved
    back = DiffusionPipeline.from_pretrained(folder, **LOAD_KWARGS.get(family, {}))
    back.set_progress_bar_config(disable=True)
    assert type(back.transformer) is type(pipe.transformer)
    assert sum(isinstance(m, QuantLinear) for m in back.transformer.modules()) == \
        sum(isinstance(m, QuantLinear) for m in pipe.transformer.modules()) > 0
    assert _same(family, back.transformer, pipe.transformer)
    assert np.array_equal(_sample(back, family), _sample(pipe, family))


def test_transformer_class_from_pretrained_and_load_quantized_are_bit_equal(saved):
    family, pipe, folder = saved
    cls = type(pipe.transformer)
    assert _same(family, cls.from_pretrained(folder / "transformer"), pipe.transformer)
    assert _same(family, ditas.load_quantized(folder / "transformer"), pipe.transformer)


def test_a_reloaded_model_saves_again_and_bf16_loading_keeps_the_scales(saved, tmp_path):
    family, pipe, folder = saved
    cls = type(pipe.transformer)
    cls.from_pretrained(folder / "transformer").save_pretrained(tmp_path / "again")
    assert _same(family, cls.from_pretrained(tmp_path / "again"), pipe.transformer)
    half = cls.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16)
    name, layer = next((n, m) for n, m in half.named_modules() if isinstance(m, QuantLinear))
    assert torch.equal(layer.wscale, pipe.transformer.get_submodule(name).wscale)  # not rounded to bf16


def test_a_ditas_folder_of_a_diffusers_model_saves_with_diffusers(saved, tmp_path):
    family, pipe, _ = saved
    ditas.save_quantized(pipe.transformer, tmp_path / "ditas", overwrite=False)
    loaded = ditas.load_quantized(tmp_path / "ditas")
    loaded.save_pretrained(tmp_path / "diffusers")
    assert _same(family, type(loaded).from_pretrained(tmp_path / "diffusers"), pipe.transformer)


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_without_diffusers_hooks_the_save_refuses_and_writes_nothing(monkeypatch, tmp_path):
    import ditas.diffusers_quantizer as dq

    monkeypatch.setattr(dq, "_classes", lambda: None)  # a diffusers without quantizer tables
    pipe = _dit_pipeline()
    ditas.quantize_(pipe.transformer, ditas.recipe_config("rtn", steps=2, calib_labels=2))
    with pytest.raises(CheckpointError) as exc:
        pipe.transformer.save_pretrained(tmp_path / "t")
    assert "ditas.save_quantized" in _one_line(exc)
    with pytest.raises(CheckpointError):
        pipe.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "t").exists()


def test_unreadable_format_and_load_time_quantization_are_refused(saved, tmp_path):
    family, pipe, folder = saved
    import shutil

    shutil.copytree(folder / "transformer", tmp_path / "t")
    cfg_file = tmp_path / "t" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["quantization"]["format_version"] = 99
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        type(pipe.transformer).from_pretrained(tmp_path / "t")
    assert re.search("format version 99", _one_line(exc))


def test_quantizing_a_float_folder_while_loading_is_refused(tmp_path):
    from diffusers import DiTTransformer2DModel

    q = tiny_diffusers_dit(0)
    ditas.quantize_(q, ditas.recipe_config("rtn", steps=2, calib_labels=2))
    tiny_diffusers_dit(0).save_pretrained(tmp_path / "fp")
    with pytest.raises(CheckpointError) as exc:  # ditas needs calibration: it cannot quantize at load time
        DiTTransformer2DModel.from_pretrained(tmp_path / "fp", quantization_config=q.hf_quantizer.quantization_config)
    assert "ditas.quantize_" in _one_line(exc)


def test_docs_example_runs(tmp_path, monkeypatch):
    """The "For diffusers users: save and load" example of docs/api.md, as written there."""
    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    section = text.split("### For diffusers users: save and load", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    fm.save_tiny_pixart_pipeline(tmp_path / "pixart")
    monkeypatch.chdir(tmp_path)
    scope = {"MODEL": str(tmp_path / "pixart")}
    exec(compile(code, "docs/api.md", "exec"), scope)
    assert scope["same"] is True
    assert any(isinstance(m, QuantLinear) for m in scope["back"].transformer.modules())
    assert any(isinstance(m, QuantLinear) for m in scope["also"].modules())


def test_a_dit_pipeline_folder_loads_as_a_pipeline_of_labels(tmp_path):
    """``load_pipeline`` (what ``ditas quantize``/``sample --model PIPELINE`` use) takes a DiTPipeline."""
    from ditas.pipelines import is_label_pipeline, load_pipeline

    _dit_pipeline().save_pretrained(tmp_path / "dit")
    assert is_label_pipeline(tmp_path / "dit")
    assert type(load_pipeline(tmp_path / "dit")).__name__ == "DiTPipeline"
