"""The kernel registry: what each kernel supports, ``use_kernels``, and one copy of the weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from ditas.errors import ConfigError
from ditas.quantization.kernels import KERNELS, canonical, choose, use_kernels
from ditas.quantization.config import ActivationFormat, WeightFormat
from ditas.quantization.linear import QuantLinear
from quant_helpers import integer_kernels, needs_int_kernel


def _layer(k=40, n=24, layout="channel", abits=8, wbits=4, seed=0, lora_rank=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
    lora = {}
    if lora_rank:
        lora = dict(lora_down=torch.randn(lora_rank, k, generator=g) * 0.1,
                    lora_up=torch.randn(n, lora_rank, generator=g) * 0.1)
    return QuantLinear.from_linear(lin, WeightFormat(wbits, layout, 8 if layout == "group" else 0), ActivationFormat(abits),
                                   **lora)


def test_choices():
    ch, grouped, a16 = _layer(), _layer(layout="group"), _layer(abits=16)
    assert choose(ch) == (*integer_kernels(), "simulated")[0]  # none exact on a CPU without VNNI
    assert choose(grouped) == "simulated" and choose(a16) == "simulated"
    if "int_mm" in integer_kernels():
        assert choose(ch, "int_mm") == "int_mm"
    else:
        with pytest.raises(ConfigError, match="not exact on this cpu"):
            choose(ch, "int_mm")
    assert choose(ch, "simulated") == "simulated"
    for former, now in (("fake", "simulated"), ("int", "auto")):  # the former backend names are refused
        with pytest.raises(ConfigError, match=f"now called '{now}'"):
            choose(ch, former)
    assert choose(ch, device="cuda") == "int_mm"  # what auto picks for a CUDA layer
    with pytest.raises(ConfigError, match="runs on cpu, not cuda"):
        choose(ch, "onednn", device="cuda")
    with pytest.raises(ConfigError, match="needs channel weights"):
        choose(grouped, "int_mm")
    with pytest.raises(ConfigError, match="<= 8-bit activations"):
        choose(a16, "onednn")
    with pytest.raises(ConfigError, match="unknown kernel"):
        canonical("cutlass")


def test_explicit_unsupported_choice_changes_nothing():
    model = nn.Sequential(_layer(seed=1), _layer(layout="group", seed=2))
    first = "1" if "int_mm" in integer_kernels() else "0"  # layer 0 too where int_mm is not exact
    with pytest.raises(ConfigError, match=f"^{first}: kernel 'int_mm'"):
        use_kernels(model, "int_mm")
    assert [m.kernel for m in model] == ["simulated", "simulated"]
    assert use_kernels(model) == {"0": choose(model[0]), "1": "simulated"}


@needs_int_kernel
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from(["onednn", "int_mm"]), rank=st.sampled_from([0, 3]))
def test_one_copy_of_the_weight_and_exact_codes(seed, kernel, rank):
    if kernel not in integer_kernels():
        kernel = integer_kernels()[0]
    layer = _layer(seed=seed, lora_rank=rank)
    codes = layer.qweight.clone()
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(seed))
    sim = layer(x)
    layer.set_kernel(kernel)
    assert "qweight" not in layer._buffers  # the kernel's prepared weight is the only copy
    assert torch.equal(layer.qweight, codes) and torch.equal(layer.state_dict()["qweight"], codes)
    assert layer.qweight.is_contiguous()
    y = layer(x)
    assert ((y - sim).norm() / sim.norm()) < 2e-6
    layer.to(torch.float32)  # a move restores the codes, the next forward prepares again
    assert torch.equal(layer._buffers["qweight"], codes)
    assert torch.equal(layer(x), y) and "qweight" not in layer._buffers
    fresh = _layer(seed=seed + 1, lora_rank=rank)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.qweight, codes)
    layer.set_kernel("simulated")
    assert torch.equal(layer._buffers["qweight"], codes) and torch.equal(layer(x), sim)


def test_registry_entries_state_their_support():
    for k in KERNELS.values():
        assert k.devices and k.layouts and k.summary and k.name
    assert KERNELS["simulated"].supports(_layer(layout="reference32", n=32), torch.device("cpu")) is None


# ------------------------------------------------------------------------------------------------
#                 Each registry entry: supports / prepare / forward vs the simulated kernel
# ------------------------------------------------------------------------------------------------

RUNNABLE = [k for k in KERNELS if KERNELS[k].available()]


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("gran", ["tensor", "token"])
@pytest.mark.parametrize("rank", [0, 4])
def test_each_entry_prepares_and_computes_the_simulated_function(name, gran, rank):
    entry = KERNELS[name]
    layer = _layer(seed=7, lora_rank=rank)
    layer.activation_format = ActivationFormat(layer.activation_format.bits, gran)
    x = torch.randn(3, 6, 40, generator=torch.Generator().manual_seed(3))
    sim = layer(x)  # a new layer runs the simulated kernel
    assert layer.kernel == "simulated"
    assert entry.supports(layer) is None
    state = entry.prepare(layer)  # the entry alone, without the layer's bookkeeping
    assert state is not None
    layer.set_kernel(name)
    assert layer.kernel_entry is entry and type(layer.kernel_state) is type(state)
    y = entry.forward(layer, x)
    assert y.shape == sim.shape and torch.equal(layer(x), y)
    assert float((y - sim).norm() / sim.norm()) < 2e-6


@pytest.mark.parametrize("name", RUNNABLE)
def test_each_entry_states_what_it_does_not_support(name):
    entry = KERNELS[name]
    for layer in (_layer(layout="group"), _layer(abits=16), _layer(layout="reference32", n=32)):
        problem = entry.supports(layer)
        w, a = layer.weight_format, layer.activation_format
        ok = w.layout in entry.layouts and a.bits <= entry.max_abits
        assert (problem is None) == ok, (w.layout, a.bits, problem)
    if "cuda" not in entry.devices:
        assert "not cuda" in entry.supports(_layer(), "cuda")


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("tensor,value", [("wzero", 1e30), ("wscale", 1e38), ("wscale", float("nan")),
                                          ("wzero", 0.5), ("wscale", -1.0)])
def test_every_kernel_refuses_garbage_scales_and_zero_points(name, tensor, value):
    layer = _layer(seed=2)
    with torch.no_grad():
        getattr(layer, tensor)[3] = value
    layer.invalidate()
    assert KERNELS[name].supports(layer) is not None
    model = nn.Sequential(layer)
    with pytest.raises(ConfigError, match="^0: kernel .*wscale/wzero"):
        use_kernels(model, name)
    with pytest.raises(ConfigError, match="^0: no kernel runs"):
        use_kernels(model)  # auto finds none either


@pytest.mark.parametrize("name", [k for k in RUNNABLE if KERNELS[k].holds_codes])
def test_integer_prepare_validates_what_it_prepares(name):
    layer = _layer(seed=4)
    with torch.no_grad():
        layer.wzero[0] = 1e30
    with pytest.raises(ConfigError, match="zero point"):
        KERNELS[name].prepare(layer)


def test_cli_kernel_choices_are_the_registry():
    from ditas.cli.main import build_parser
    from ditas.quantization.kernels import kernel_names

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "sample" in a.choices).choices
    for command in ("sample", "compare", "benchmark"):
        action = next(a for a in sub[command]._actions if "--kernel" in a.option_strings)
        assert tuple(action.choices) == kernel_names() == ("auto", *KERNELS)
        assert action.default == "auto"
        assert not any("--backend" in a.option_strings for a in sub[command]._actions)
