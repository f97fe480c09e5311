"""The kernel registry: what each kernel supports, ``use_kernels``, and one copy of the weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from ditas.errors import ConfigError
from ditas.quantization.int_kernels import available_kernels
from ditas.quantization.kernels import KERNELS, canonical, choose, use_kernels
from ditas.quantization.linear import QuantLinear
from quant_helpers import needs_int_kernel


def _layer(k=40, n=24, layout="channel", abits=8, wbits=4, seed=0, lora_rank=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
    lora = {}
    if lora_rank:
        lora = dict(lora_down=torch.randn(lora_rank, k, generator=g) * 0.1,
                    lora_up=torch.randn(n, lora_rank, generator=g) * 0.1)
    return QuantLinear.from_linear(lin, wbits=wbits, abits=abits, layout=layout,
                                   group_size=8 if layout == "group" else 0, **lora)


def test_choices():
    ch, grouped, a16 = _layer(), _layer(layout="group"), _layer(abits=16)
    assert choose(ch) == (*available_kernels(), "simulated")[0]  # none exact on a CPU without VNNI
    assert choose(grouped) == "simulated" and choose(a16) == "simulated"
    if "int_mm" in available_kernels():
        assert choose(ch, "int_mm") == "int_mm"
    else:
        with pytest.raises(ConfigError, match="not exact on this cpu"):
            choose(ch, "int_mm")
    assert choose(ch, "fake") == "simulated"
    assert choose(ch, "int") == choose(ch)
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
    first = "1" if "int_mm" in available_kernels() else "0"  # layer 0 too where int_mm is not exact
    with pytest.raises(ConfigError, match=f"^{first}: kernel 'int_mm'"):
        use_kernels(model, "int_mm")
    assert [m.kernel for m in model] == ["simulated", "simulated"]
    assert use_kernels(model) == {"0": choose(model[0]), "1": "simulated"}


@needs_int_kernel
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from(["onednn", "int_mm"]), rank=st.sampled_from([0, 3]))
def test_one_copy_of_the_weight_and_exact_codes(seed, kernel, rank):
    if kernel not in available_kernels():
        kernel = available_kernels()[0]
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
        assert k.devices and k.layouts and k.summary
    assert KERNELS["simulated"].problem(_layer(layout="reference32", n=32), torch.device("cpu")) is None
