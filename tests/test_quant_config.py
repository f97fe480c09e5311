"""QuantConfig validation and recipe presets."""

from __future__ import annotations

import dataclasses

import pytest

from ditas.errors import ConfigError
from ditas.quantization.config import FLAT_NAMES, QuantConfig
from ditas.quantization.recipes import RECIPES, recipe_config


def _nested(flat: dict) -> QuantConfig:
    """The config the flat names describe, built from nested specs (as code builds one)."""
    from ditas.quantization import config as c

    classes = {"weights": c.WeightFormat, "activations": c.ActivationFormat, "smooth": c.SmoothingSpec,
               "lora": c.LoRASpec, "calibration": c.CalibrationSpec}
    per_spec: dict = {}
    for name, value in flat.items():
        spec, field = FLAT_NAMES[name]
        per_spec.setdefault(spec, {})[field] = value
    return QuantConfig(**{spec: classes[spec](**values) for spec, values in per_spec.items()})


@pytest.mark.parametrize("kwargs, words", [
    (dict(w_bits=1), "weight bits"), (dict(w_bits=9), "weight bits"), (dict(a_bits=3), "activation bits"),
    (dict(a_bits=17), "activation bits"), (dict(weight_layout="row"), "weight layout"),
    (dict(act_granularity="channel"), "activation granularity"), (dict(alpha=1.5), "alpha"),
    (dict(alpha_grid=()), "alpha grid"), (dict(lora_rank=-1), "LoRA rank"), (dict(lora_rounds=0), "LoRA rounds"),
    (dict(calib_labels=0), "calibration labels"), (dict(steps=0), "calibration steps"), (dict(steps=1), "in 2..1000"),
    (dict(sampler="euler"), "sampler"), (dict(weight_layout="group", group_size=0), "group size"),
    (dict(smooth_roles=("qkv", "head")), "smooth roles"), (dict(w_bits=4.0), "weight bits"),
])
def test_invalid_values_raise_config_error(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        _nested(kwargs)  # the specs refuse it
    with pytest.raises(ConfigError, match=words):
        QuantConfig.from_dict(kwargs)  # and so does the reading path of older (flat) folders
    with pytest.raises(ConfigError, match=words):
        recipe_config("ditas", **kwargs)


def test_every_recipe_is_valid_and_named():
    for name in RECIPES:
        cfg = recipe_config(name)
        assert cfg.recipe == name
    assert recipe_config("ditas").lora.rank == 32 and recipe_config("ditas").weights.layout == "channel"
    assert recipe_config("rtn").smooth.method == "none" and recipe_config("rtn").lora.rank == 0
    paper = recipe_config("paper")
    assert paper.weights.layout == "reference32" and paper.weights.range_mode == "reference"
    assert paper.lora.keep == "last"
    assert recipe_config("smoothquant").smooth.alpha == 0.5 and not recipe_config("smoothquant").smooth.search


def test_unknown_recipe_and_overrides():
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe_config("gptq")
    with pytest.raises(ConfigError, match="weight bits"):
        recipe_config("ditas", w_bits=12)
    assert recipe_config("ditas", w_bits=3).weights.bits == 3
    # an explicit None is kept, not replaced by the recipe's value
    assert recipe_config("ditas").smooth.search_tokens == 512
    assert recipe_config("ditas", search_tokens=None).smooth.search_tokens is None
    with pytest.raises(ConfigError, match="LoRA rank"):
        recipe_config("ditas", lora_rank=None)


def test_round_trip_and_labels():
    cfg = recipe_config("ditas", calib_labels=(1, 2, 3))
    again = QuantConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown"):
        QuantConfig.from_dict({"bits": 4})
    from ditas.quantization.config import CalibrationSpec

    assert QuantConfig(calibration=CalibrationSpec(labels=4)).labels_for(1000) == [207, 360, 387, 974]
    assert QuantConfig(calibration=CalibrationSpec(labels=5)).labels_for(10) == [0, 2, 4, 6, 8]
    assert QuantConfig(calibration=CalibrationSpec(labels=12)).labels_for(10)[-2:] == [0, 1]
    with pytest.raises(ConfigError, match="out of range"):
        QuantConfig(calibration=CalibrationSpec(labels=(3, 11))).labels_for(10)


def test_nested_specs_are_the_config_and_flat_dicts_still_read():
    from ditas.quantization.config import CalibrationSpec, LoRASpec, SmoothingSpec, WeightFormat

    cfg = QuantConfig(weights=WeightFormat(bits=3, layout="group", group_size=16), lora=LoRASpec(rank=8),
                      calibration=CalibrationSpec(steps=20), smooth=SmoothingSpec(search_tokens=None))
    assert (cfg.weights.bits, cfg.weights.layout, cfg.weights.group_size, cfg.lora.rank,
            cfg.calibration.steps) == (3, "group", 16, 8, 20)
    assert cfg.smooth.search_tokens is None
    assert cfg == _nested(dict(w_bits=3, weight_layout="group", group_size=16, lora_rank=8, steps=20,
                               search_tokens=None))
    nested = cfg.to_dict()
    assert set(nested) == {"recipe", "weights", "activations", "smooth", "lora", "calibration", "adaln", "scope", "late"}
    assert nested["weights"] == {"bits": 3, "layout": "group", "group_size": 16, "range_mode": "levels",
                                 "rounding": "nearest", "gptq_order": "natural", "format": "int"}
    # older folders hold the flat form: one entry per FLAT_NAMES key
    flat = {"recipe": cfg.recipe, "adaln": cfg.adaln,
            **{n: getattr(getattr(cfg, spec), field) for n, (spec, field) in FLAT_NAMES.items()}}
    assert QuantConfig.from_dict(nested) == cfg == QuantConfig.from_dict(flat)
    with pytest.raises(ConfigError, match="weight bits"):
        WeightFormat(bits=9)
    with pytest.raises(ConfigError, match="unknown keys in quantization config 'lora'"):
        QuantConfig.from_dict({"lora": {"rank": 4, "alpha": 1}})
    with pytest.raises(ConfigError, match="one range mode"):
        QuantConfig(weights=WeightFormat(range_mode="reference"))
    assert recipe_config("paper").activations.range_mode == "reference"  # the flat range_mode sets both


@pytest.mark.parametrize("name", sorted(FLAT_NAMES))
def test_flat_names_are_no_api_of_quantconfig(name):
    """A flat keyword is refused, naming the nested spec and recipe_config; no flat attribute."""
    spec, field = FLAT_NAMES[name]
    with pytest.raises(ConfigError, match=rf"{name} -> {spec}=\w+\({field}=.*recipe_config"):
        QuantConfig(**{name: getattr(getattr(QuantConfig(), spec), field)})
    assert not hasattr(QuantConfig(), name)


def test_configs_are_frozen_and_changes_are_validated():
    from ditas.quantization.config import ActivationFormat, LoRASpec, WeightFormat

    cfg = recipe_config("ditas")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weights.bits = 99  # no unvalidated setter
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora = LoRASpec(rank=4)
    with pytest.raises(ConfigError, match="weight bits"):
        dataclasses.replace(cfg.weights, bits=99)
    with pytest.raises(ConfigError, match="LoRA rank"):
        cfg.with_flat({"lora_rank": -1})
    with pytest.raises(ConfigError, match="one range mode"):  # a change checked against the whole config
        cfg.replace(weights=WeightFormat(range_mode="reference"))
    with pytest.raises(ConfigError, match="weights must be a WeightFormat"):
        cfg.replace(weights=ActivationFormat())
    smaller = cfg.replace(lora=LoRASpec(rank=4))
    assert smaller.lora.rank == 4 and cfg.lora.rank == 32  # a new config; the old one is unchanged
    assert cfg.with_flat({"range_mode": "reference"}).activations.range_mode == "reference"


def test_quantlinear_carries_its_formats():
    import torch

    from ditas.quantization.config import ActivationFormat, WeightFormat
    from ditas.quantization.linear import QuantLinear

    w, a = WeightFormat(3, "group", 16, "levels"), ActivationFormat(6, "token", "levels")
    q = QuantLinear.from_linear(torch.nn.Linear(32, 8), w, a)
    assert q.weight_format == w and q.activation_format == a
    assert "W3 group16 asym, A6 dynamic per-token" in repr(q)  # the repr states its precision
    with pytest.raises(ConfigError, match="takes a WeightFormat and an ActivationFormat"):
        QuantLinear(32, 8, 3, 6)
    with pytest.raises(ConfigError, match="one range mode"):
        QuantLinear(32, 8, WeightFormat(range_mode="reference"), a)
