"""Small models shared by the quantization tests (not a test module)."""

from __future__ import annotations

import torch

from ditas import DiT, DiTConfig


def random_dit(seed: int = 0, in_channels: int = 1, hidden: int = 64, depth: int = 2, heads: int = 4,
               input_size: int = 8, num_classes: int = 10) -> DiT:
    """A small DiT whose adaLN and output layers are non-zero (the published init zeroes them,
    which would make every block the identity)."""
    torch.manual_seed(seed)
    m = DiT(DiTConfig(input_size=input_size, patch_size=2, in_channels=in_channels, hidden_size=hidden,
                      depth=depth, num_heads=heads, num_classes=num_classes))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
            elif name.endswith("bias") and "blocks" in name:
                p.normal_(0, 0.05)
        # outlier input channels, as trained transformers have
        for b in m.blocks:
            b.attn.qkv.weight[:, :3] *= 4
            b.mlp.fc2.weight[:, :5] *= 3
    return m.eval()


def tiny_diffusers_dit(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 16, num_classes: int = 10,
                       untie: bool = True, outliers: bool = True):
    """A tiny diffusers ``DiTTransformer2DModel`` (4 latent channels, 8x8, learned sigma) with
    non-zero adaLN, per-block embedders that differ between blocks (``untie``), and a few input
    channels of every quantized linear scaled up (``outliers``), as trained transformers have."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                              out_channels=8, num_layers=layers, sample_size=8, patch_size=2,
                              num_embeds_ada_norm=num_classes)
    d = heads * head_dim
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif untie and "norm1.emb" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        if outliers:
            for b in m.transformer_blocks:
                for chunk in (0, 1, 3, 4):  # shift/scale of the attention and MLP inputs
                    b.norm1.linear.bias[chunk * d: chunk * d + 3] += 6.0
                b.attn1.to_v.weight[:4] *= 8       # attention output (to_out's input)
                b.ff.net[0].proj.weight[:5] *= 6   # GELU(fc1) (fc2's input)
    return m.eval()


def class_loop_calls(model, steps: int = 3, n: int = 2, seed: int = 0, guided: bool = True):
    """Drives a class-conditional diffusers DiT the way a pipeline would (a batch of noisy latents
    per step, labels and their null labels stacked for guidance); returns the inputs per step."""
    g = torch.Generator().manual_seed(seed)
    null = model.config.num_embeds_ada_norm
    y = torch.randint(0, null, (n,), generator=g)
    inputs = []
    for i in range(steps):
        x = torch.randn(n, 4, 8, 8, generator=g)
        t = torch.full((n,), 999 - i * (999 // max(steps - 1, 1)))
        if guided:
            x, t, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])
        else:
            yy = y
        inputs.append((x, t, yy))
        with torch.no_grad():
            model(x, timestep=t, class_labels=yy)
    return inputs


def fold_smoothing_in_float(model, cal):
    """The float model with every smoothing factor of ``cal`` applied the way ``convert`` folds it,
    but weights kept float (``W * s``): the function must not change."""
    from ditas.quantization.smoothing import OnTheFlySmooth, apply_fold

    with torch.no_grad():
        for b in cal.plan:
            for grp in b.groups:
                s = cal.layers[grp.name].smooth
                if s is None:
                    continue
                fold = cal.folds[grp.name]
                if fold.kind == "on_the_fly":
                    for m in grp.members:
                        parent, _, child = m.name.rpartition(".")
                        setattr(model.get_submodule(parent), child, OnTheFlySmooth(model.get_submodule(m.name), s))
                    continue
                apply_fold(model, fold, s)
                for m in grp.members:
                    model.get_submodule(m.name).weight.mul_(s[None, :])
    return model


# DiT-specific folds by hand (the algorithms fold through the adapter's ``Fold`` descriptions;
# these tests check that route against a direct fold)


def v_rows(out_features: int) -> slice:
    """Rows of a DiT's fused ``qkv`` weight that produce V (the last third)."""
    d = out_features // 3
    return slice(2 * d, 3 * d)


def fold_into_adaln(block, role: str, s) -> None:
    """Divides the modulated input of ``role`` (``qkv`` or ``fc1``) of a DiT block by ``s``."""
    from ditas.model.adapters.dit import ADALN_CHUNKS
    from ditas.quantization.smoothing import fold_into_modulation_linear

    sh, sc = ADALN_CHUNKS[role]
    fold_into_modulation_linear(block.adaLN_modulation[1], s, 6, sh, sc)


def fold_into_v_rows(qkv, s) -> None:
    """Divides the V rows of a fused ``qkv`` (float or ``QuantLinear``) by ``s``."""
    from ditas.quantization.smoothing import fold_into_rows

    fold_into_rows(qkv, s, v_rows(qkv.out_features))


# the integer kernels of the registry this torch build runs on the CPU, most preferred first
def integer_kernels() -> tuple[str, ...]:
    from ditas.quantization.kernels import KERNELS

    return tuple(k.name for k in sorted(KERNELS.values(), key=lambda k: k.preference)
                 if k.holds_codes and k.available() and "cpu" in k.devices and k.exact_on(torch.device("cpu")))


def int_linear(layer, codes, a_scale, a_zero, kernel: str | None = None):
    """The integer product of ``kernel``'s entry (default: the most preferred), the layer switched to it."""
    from ditas.quantization.kernels import KERNELS

    kernel = kernel or integer_kernels()[0]
    if layer.kernel != kernel:
        layer.set_kernel(kernel)
    return KERNELS[kernel].linear(layer, codes, a_scale, a_zero)


def int_forward(layer, x, kernel: str | None = None, lora_bf16: bool | None = None):
    """The fused forward of ``kernel``'s entry (default: the most preferred) on ``layer`` as it is."""
    from ditas.quantization.kernels import KERNELS

    return KERNELS[kernel or integer_kernels()[0]].forward(layer, x, lora_bf16=lora_bf16)


def assert_close_to_recorded(out: torch.Tensor, recorded: torch.Tensor, ulps: float = 16) -> None:
    """``out`` equals a float tensor recorded on another machine (or CPU code path) up to float
    rounding: within ``ulps`` units in the last place of the recorded tensor's largest magnitude
    (sums round at the scale of their largest terms). Measured on the legacy DiT folder across
    AVX-512, AVX2 and the scalar ATen paths: at most 2.3. Bit-identity is asserted only between two
    computations in the same run."""
    assert out.shape == recorded.shape and out.dtype == recorded.dtype
    tol = ulps * torch.finfo(recorded.dtype).eps * float(recorded.abs().max())
    err = float((out - recorded).abs().max())
    assert err <= tol, f"differs from the recorded tensor by {err:.3g} (more than {ulps} ulps of its largest value)"


def needs_int_kernel(test):
    """Skips ``test`` where no integer kernel is exact (a CPU without VNNI, or
    ``ONEDNN_MAX_CPU_ISA=AVX2``): ditas then runs the simulated kernel, which other tests cover."""
    import pytest

    return pytest.mark.skipif(not integer_kernels(), reason="no integer kernel is exact on this CPU")(test)


def scale_lora_delta(model, ratio: float, seed: int = 3) -> dict[str, float]:
    """Random non-zero factors for every peft LoRA layer of ``model`` (peft starts ``lora_B`` at
    zero), scaled so each layer's delta ``scaling * B @ A`` has ``ratio`` times the Frobenius norm
    of the layer's base weight, as trained LoRAs do (about 0.05-0.2); returns the ratios set.
    The base weight of a quantized layer is its dequantized weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, BaseTunerLayer) or not hasattr(m, "lora_A"):
                continue
            base = m.get_base_layer()
            w = base.dequantized_weight() if hasattr(base, "dequantized_weight") else base.weight
            for key in m.lora_A:
                a, b = m.lora_A[key].weight, m.lora_B[key].weight
                a.copy_(torch.randn(a.shape, generator=g))
                b.copy_(torch.randn(b.shape, generator=g))
                delta = m.scaling[key] * (b.float() @ a.float())
                b.mul_(ratio * w.float().norm() / delta.norm())
                out[name] = float(m.scaling[key] * (b.float() @ a.float()).norm() / w.float().norm())
    return out
