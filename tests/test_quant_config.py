"""QuantConfig validation and recipe presets."""

from __future__ import annotations

import pytest

from ditas.errors import ConfigError
from ditas.quantization.config import QuantConfig
from ditas.quantization.recipes import RECIPES, recipe_config


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
        QuantConfig(**kwargs)


def test_every_recipe_is_valid_and_named():
    for name in RECIPES:
        cfg = recipe_config(name)
        assert cfg.recipe == name
    assert recipe_config("ditas").lora_rank == 32 and recipe_config("ditas").weight_layout == "channel"
    assert recipe_config("rtn").smoothing == "none" and recipe_config("rtn").lora_rank == 0
    paper = recipe_config("paper")
    assert paper.weight_layout == "reference32" and paper.range_mode == "reference" and paper.lora_keep == "last"
    assert recipe_config("smoothquant").alpha == 0.5 and not recipe_config("smoothquant").search


def test_unknown_recipe_and_overrides():
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe_config("gptq")
    with pytest.raises(ConfigError, match="weight bits"):
        recipe_config("ditas", w_bits=12)
    assert recipe_config("ditas", w_bits=3).w_bits == 3
    # an explicit None is kept, not replaced by the recipe's value
    assert recipe_config("ditas").search_tokens == 512 and recipe_config("ditas", search_tokens=None).search_tokens is None
    with pytest.raises(ConfigError, match="LoRA rank"):
        recipe_config("ditas", lora_rank=None)


def test_round_trip_and_labels():
    cfg = recipe_config("ditas", calib_labels=(1, 2, 3))
    again = QuantConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown"):
        QuantConfig.from_dict({"bits": 4})
    assert QuantConfig(calib_labels=4).labels_for(1000) == [207, 360, 387, 974]
    assert QuantConfig(calib_labels=5).labels_for(10) == [0, 2, 4, 6, 8]
    assert QuantConfig(calib_labels=12).labels_for(10)[-2:] == [0, 1]
    with pytest.raises(ConfigError, match="out of range"):
        QuantConfig(calib_labels=(3, 11)).labels_for(10)


def test_nested_specs_and_flat_names_are_one_config():
    from ditas.quantization.config import FLAT_NAMES, CalibrationSpec, LoRASpec, WeightFormat

    cfg = QuantConfig(weights=WeightFormat(bits=3, layout="group", group_size=16), lora=LoRASpec(rank=8),
                      calibration=CalibrationSpec(steps=20), search_tokens=None)
    assert (cfg.w_bits, cfg.weight_layout, cfg.group_size, cfg.lora_rank, cfg.steps) == (3, "group", 16, 8, 20)
    assert cfg.smooth.search_tokens is None and cfg.search_tokens is None
    assert cfg == QuantConfig(w_bits=3, weight_layout="group", group_size=16, lora_rank=8, steps=20, search_tokens=None)
    nested = cfg.to_dict()
    assert set(nested) == {"recipe", "weights", "activations", "smooth", "lora", "calibration", "adaln"}
    assert nested["weights"] == {"bits": 3, "layout": "group", "group_size": 16, "range_mode": "levels"}
    flat = {"recipe": cfg.recipe, "adaln": cfg.adaln, **{n: getattr(cfg, n) for n in FLAT_NAMES}}  # older folders
    assert QuantConfig.from_dict(nested) == cfg == QuantConfig.from_dict(flat)
    with pytest.raises(ConfigError, match="weight bits"):
        WeightFormat(bits=9)
    with pytest.raises(ConfigError, match="unknown keys in quantization config 'lora'"):
        QuantConfig.from_dict({"lora": {"rank": 4, "alpha": 1}})
    with pytest.raises(ConfigError, match="one range mode"):
        QuantConfig(weights=WeightFormat(range_mode="reference"))
    assert recipe_config("paper").activations.range_mode == "reference"  # the flat range_mode sets both


def test_quantlinear_carries_its_formats():
    import torch

    from ditas.quantization.config import ActivationFormat, WeightFormat
    from ditas.quantization.linear import QuantLinear

    q = QuantLinear.from_linear(torch.nn.Linear(32, 8), wbits=3, abits=6, layout="group", group_size=16,
                                act_granularity="token")
    assert q.weight_format == WeightFormat(3, "group", 16, "levels")
    assert q.activation_format == ActivationFormat(6, "token", "levels")
