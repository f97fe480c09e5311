"""torch.compile and torch.export of quantized models: the ditas:: custom ops (kernels/ops.py).

The ops are checked by ``torch.library.opcheck`` (schema, fake implementation, dispatch) and
against the plain functions they wrap (bit-identical in eager: the kernels call the ops). A tiny
quantized DiT compiles in one graph (``fullgraph=True``) on every kernel and both activation
granularities and gives its eager output within float rounding; inductor is run for the default
kernel here and for every kernel under ``-m slow`` (CPU compilation takes 20-40 s a model), the
``aot_eager`` backend (dynamo + fake tensors + AOT tracing, no code generation) for all of them.
"""

from __future__ import annotations

import pytest
import torch

import ditas
from ditas.quantization.kernels import KERNELS, ops, use_kernels
from ditas.quantization.kernels.int_mm import int_mm as int_mm_padded
from ditas.quantization.kernels.int_mm import int_mm_linear
from ditas.quantization.kernels.onednn import onednn_linear, onednn_works
from ditas.quantization.config import ActivationFormat, WeightFormat
from ditas.quantization.linear import QuantLinear
from quant_helpers import random_dit

CPU_KERNELS = [k.name for k in KERNELS.values() if k.available() and "cpu" in k.devices]
GRANULARITIES = ("tensor", "token")


def _prepared(kernel: str, rank: int = 4, seed: int = 0, residual: bool = False) -> QuantLinear:
    """A per-channel W4A8 layer with a LoRA branch, prepared for ``kernel`` (``residual``: zero
    points far from the codes, so some rows keep a residual zero point)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 40, generator=g))
    m = QuantLinear.from_linear(lin, WeightFormat(8 if residual else 4), ActivationFormat(8),
                                lora_down=torch.randn(rank, 40, generator=g) * 0.1,
                                lora_up=torch.randn(24, rank, generator=g) * 0.1)
    if residual:
        with torch.no_grad():
            m.wzero[:3] = 250.0
    m.set_kernel(kernel)
    return m


def _codes(per_token: bool, m: int = 7, k: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (m, k), generator=g).float()
    if per_token:
        return codes, torch.rand(m, 1, generator=g) * 0.1 + 0.01, torch.randint(0, 256, (m, 1), generator=g).float()
    return codes, torch.tensor(0.03), torch.tensor(117.0)


def _int_mm_args(st, per_token: bool):
    return (*_codes(per_token), st.w_int8, st.rowsum, st.wscale, st.residual, st.bias)


def _onednn_args(st, per_token: bool, other: bool = False):
    codes = _codes(per_token)
    extra = torch.randn(codes[0].shape[0], st.wscale.shape[0]) if other else None
    return (*codes, st.packed, st.wscale, st.zero_points, st.rowsum_scaled, st.residual_scaled, st.bias, extra)


def test_int_mm_op_matches_the_padded_function_and_opcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 13), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (13, 11), generator=g, dtype=torch.int8)
    assert torch.equal(ops.int_mm(a, b), int_mm_padded(a, b))
    assert torch.equal(ops.int_mm(a, b).long(), a.long() @ b.long())
    torch.library.opcheck(ops.int_mm, (a, b))


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_int_mm_linear_op_is_the_function_and_passes_opcheck(per_token, residual):
    st = _prepared("int_mm", residual=residual).kernel_state
    assert (st.residual is not None) == residual
    args = _int_mm_args(st, per_token)
    assert torch.equal(ops.int_mm_linear(*args), int_mm_linear(*args))  # eager: bit-identical
    torch.library.opcheck(ops.int_mm_linear, args)


@pytest.mark.skipif(not onednn_works(), reason="this torch build has no oneDNN quantized linear")
@pytest.mark.parametrize("per_token,residual,other", [(False, False, False), (False, False, True),
                                                       (False, True, False), (True, False, False),
                                                       (True, True, False)])
def test_onednn_linear_op_is_the_function_and_passes_opcheck(per_token, residual, other):
    st = _prepared("onednn", residual=residual).kernel_state
    assert (st.residual is not None) == residual
    args = _onednn_args(st, per_token, other)
    before = [a.clone() if isinstance(a, torch.Tensor) and a.layout == torch.strided else None for a in args]
    assert torch.equal(ops.onednn_linear(*args), onednn_linear(*args))
    # torch.library.opcheck cannot run this op: each of its tests reads every input's storage,
    # which the packed (mkldnn) weight has not. What it checks is checked here: the fake
    # implementation (shape, dtype) by tracing the op with fake tensors (aot_eager), and that no
    # input is mutated, on the strided inputs
    traced = torch.compile(ops.onednn_linear, backend="aot_eager", fullgraph=True)(*args)
    assert torch.equal(traced, onednn_linear(*args))
    for a, b in zip(args, before):
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b)


def test_every_available_integer_kernel_calls_its_op():
    """The products of the CPU integer kernels go through the ditas:: ops (what compile traces)."""
    for name in CPU_KERNELS:
        if not KERNELS[name].holds_codes:
            continue
        layer = _prepared(name)
        x = torch.randn(3, 40)
        with torch.profiler.profile() as prof:
            layer(x)
        called = {e.name for e in prof.events()}
        assert f"ditas::{name}_linear" in called, (name, sorted(called))


@pytest.fixture(scope="module")
def quantized_dits():
    """A tiny DiT quantized by the default W4A8 recipe with LoRA, per-tensor and per-token."""
    out = {}
    for gran in GRANULARITIES:
        m = random_dit(0, hidden=32, heads=2, depth=1)
        ditas.quantize_(m, ditas.recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4, lora_rounds=1,
                                               alpha_grid=(0.5,), act_granularity=gran))
        out[gran] = m
    return out


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([999, 20]), torch.tensor([3, 10])


def _compiled_vs_eager(model, kernel: str, backend: str) -> float:
    """Max |compiled - eager| relative to max |eager| of ``model`` on ``kernel`` (one graph)."""
    use_kernels(model, kernel)  # (the shared model: a oneDNN-prepared model cannot be deep-copied)
    x, t, y = _inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, t, y)
        compiled = torch.compile(model, backend=backend, fullgraph=True)(x, t, y)
    assert compiled.shape == eager.shape
    return float((compiled - eager).abs().max() / eager.abs().max())


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_traced_in_one_graph_equals_eager(quantized_dits, kernel, gran):
    """dynamo + AOT autograd with fake tensors (no code generation): one graph, eager's result."""
    assert _compiled_vs_eager(quantized_dits[gran], kernel, "aot_eager") < 1e-5


def test_inductor_compile_of_the_default_kernel_equals_eager(quantized_dits):
    assert _compiled_vs_eager(quantized_dits["tensor"], "auto", "inductor") < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_inductor_compile_equals_eager_every_kernel(quantized_dits, kernel, gran):
    assert _compiled_vs_eager(quantized_dits[gran], kernel, "inductor") < 1e-5


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_export_of_a_quantized_block(quantized_dits, kernel):
    model = quantized_dits["tensor"]
    use_kernels(model, kernel)
    block = model.blocks[0]
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 16, 32, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        ep = torch.export.export(block, (x, c))
        assert torch.allclose(ep.module()(x, c), block(x, c), rtol=1e-5, atol=1e-6)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if KERNELS[kernel].holds_codes:
        assert f"ditas.{kernel}_linear.default" in targets, sorted(targets)


@pytest.mark.slow
def test_inductor_compile_of_a_quantized_pixart_equals_eager():
    """A tiny diffusers PixArt transformer quantized by the default recipe (the default kernels)."""
    import family_models as fm
    from ditas.calibration.recording import record_calibration

    model = fm.tiny_pixart(0, layers=1)
    with torch.no_grad(), record_calibration(model) as calib:
        for step in range(2):
            model(**fm.call_kwargs(model, seed=1, step=step))
    ditas.quantize_(model, ditas.recipe_config("ditas", lora_rank=4, lora_rounds=1, alpha_grid=(0.5,)), calib)
    kwargs = fm.call_kwargs(model, seed=7)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**kwargs)[0]
        compiled = torch.compile(model, fullgraph=True)(**kwargs)[0]
    assert float((compiled - eager).abs().max() / eager.abs().max()) < 1e-5


def _quantized_family(family: str):
    """A tiny diffusers transformer of ``family`` quantized by the default recipe (with LoRA) and
    the keyword arguments of one held-out call."""
    import family_models as fm
    from quant_helpers import tiny_diffusers_dit

    cfg = ditas.recipe_config("ditas", lora_rank=4, lora_rounds=1, alpha_grid=(0.5,))
    if family == "diffusers-dit":
        model = tiny_diffusers_dit(0, layers=1)
        ditas.quantize_(model, cfg.with_flat({"steps": 2, "calib_labels": 2}))  # its own class-conditional run
        g = torch.Generator().manual_seed(7)
        return model, {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([900, 50]),
                       "class_labels": torch.tensor([1, 7])}
    model = {"sd3": lambda: fm.tiny_sd3(0, layers=1), "flux": lambda: fm.tiny_flux(0, layers=1, single_layers=1)}[family]()
    with torch.no_grad(), ditas.record_calibration(model) as calib:
        for step in range(2):
            model(**fm.call_kwargs(model, seed=1, step=step))
    ditas.quantize_(model, cfg, calib)
    return model, fm.call_kwargs(model, seed=7)


@pytest.mark.slow  # inductor on CPU: 60-230 s a model on the shared 2-core machine
@pytest.mark.parametrize("family", ["sd3", "flux", "diffusers-dit"])
def test_inductor_compile_of_quantized_diffusers_families_equals_eager(family):
    """SD3, Flux and diffusers' DiT, quantized (default kernels), compiled by inductor in one graph."""
    model, kwargs = _quantized_family(family)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**kwargs)[0]
        compiled = torch.compile(model, fullgraph=True)(**kwargs)[0]
    assert compiled.shape == eager.shape
    assert float((compiled - eager).abs().max() / eager.abs().max()) < 1e-5
