"""``benchmarks/diffusers_zoo.py``: every transformer class of the installed diffusers has a tiny
entry that builds and runs one float forward with the documented output shape; the zoo's list is
the installed diffusers' list (a new diffusers release with a new class fails here, not silently)."""

from __future__ import annotations

import pytest
import torch

from benchmark_modules import load_benchmark

zoo = load_benchmark("diffusers_zoo")


def test_the_zoo_lists_exactly_the_installed_transformer_classes():
    import diffusers
    from torch import nn

    installed = zoo.installed_classes()
    assert sorted(zoo.ZOO) == installed
    assert all(issubclass(getattr(diffusers, n), nn.Module) for n in installed)
    assert all(e.name == n for n, e in zoo.ZOO.items())
    # an entry either runs or says why not, in one line
    assert all((e.inputs is None) == bool(e.reason) and "\n" not in (e.reason or "") for e in zoo.ZOO.values())


@pytest.mark.parametrize("name", [n for n, e in sorted(zoo.ZOO.items()) if not e.reason])
def test_every_zoo_model_builds_and_runs_one_forward(name):
    model = zoo.build(name, seed=0)
    zero = [n for n, p in model.named_parameters() if p.is_floating_point() and p.numel() > 1 and not p.any()]
    assert not zero, f"parameters left at zero: {zero[:3]}"
    with torch.no_grad():
        out = zoo.output_tensors(model(**zoo.inputs(name, seed=1)))
        again = zoo.output_tensors(model(**zoo.inputs(name, seed=1)))
        other = zoo.output_tensors(model(**zoo.inputs(name, seed=2)))
    entry = zoo.ZOO[name]
    assert out and tuple(out[0].shape) == entry.output_shape(entry.batch)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out)
    assert torch.equal(out[0], again[0])  # inputs are a function of the seed
    assert not torch.equal(out[0], other[0])  # and another seed is another (held-out) input
    assert out[0].std() > 1e-3
