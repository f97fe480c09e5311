"""Is a LoRA's extra PSNR loss on a quantized tiny model the quantizer's fault or the model's sensitivity?

For a tiny random PixArt, Flux and SD3 (tests/family_models.py) with a peft LoRA built as in
tests/test_lora_adapters.py::test_pixart_through_peft, prints PSNR(pert(M), M) for M = FP and
M = FP+LoRA, and their gap, for three perturbations:

- ``W4A8`` / ``W8A16``: ditas quantization (the adapter injected into the quantized model, as the test);
- ``noise(W4A8)`` / ``noise(W8A16)``: Gaussian noise added to the float weight of every linear ditas
  quantizes, per layer of the Frobenius norm of that layer's weight error in the FP domain:
  ``diag(output_fold) (W_deq + lora_up lora_down) diag(1 / (smooth * input_fold)) - W``
  (the quantized layer's effective weight with its smoothing and folds undone); several seeds;
- ``shaped(...)``: the same norm, but the noise i.i.d. in the quantized layer's own (smoothed,
  folded) domain and mapped back, as a quantizer's error is: small on the input channels that
  smoothing scaled down, where the activations are large.

If the noise loses as much more on FP+LoRA than on FP as the quantizer does, the LoRA'd model is
simply more sensitive to a weight perturbation of that size (the quantizer is not at fault).

    PYTHONPATH=src:tests OMP_NUM_THREADS=1 python benchmarks/lora_sensitivity.py [--seeds 4]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import ditas  # noqa: E402
from ditas.evaluation.metrics import psnr  # noqa: E402
from ditas.quantization.folds import fold_factors  # noqa: E402
from ditas.quantization.linear import QuantLinear  # noqa: E402
import family_models as fm  # noqa: E402
from test_lora_adapters import SCALE, TARGETS, _random_lora  # noqa: E402

FAMILIES = {"pixart": fm.tiny_pixart, "flux": fm.tiny_flux, "sd3": fm.tiny_sd3}


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**fm.call_kwargs(model, seed=7, step=s))[0] for s in range(3)])


def calibrate(fp):
    with ditas.record_calibration(fp) as calib, torch.no_grad():
        for step in range(3):
            fp(**fm.call_kwargs(fp, seed=1, step=step))
    return calib


def quantized(fp, calib, w_bits: int, a_bits: int):
    q = copy.deepcopy(fp)
    ditas.quantize_(q, ditas.recipe_config("ditas", lora_rank=4, lora_rounds=2, w_bits=w_bits, a_bits=a_bits), calib)
    return q


def domain_scales(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols): W_fp-domain = diag(rows) W_layer diag(1 / cols) (smoothing and folds undone)."""
    if layer.rotation:
        raise NotImplementedError("rotated layers")
    s_in, s_out = fold_factors(layer)
    cols = torch.ones(layer.in_features) if layer.smooth is None else layer.smooth.detach().float()
    if s_in is not None:
        cols = cols * s_in.float()
    rows = torch.ones(layer.out_features) if s_out is None else s_out.float()
    return rows, cols


def fp_domain_weight(layer: QuantLinear) -> torch.Tensor:
    """The quantized layer's effective weight with its smoothing and folds undone (what it stands for in FP)."""
    rows, cols = domain_scales(layer)
    return layer.effective_weight().detach().float() * rows[:, None] / cols


def errors(fp, q) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """Per quantized layer: (||W_fp-domain(q) - W||_F, rows, cols)."""
    return {name: (float((fp_domain_weight(m) - fp.get_submodule(name).weight.detach().float()).norm()),
                   *domain_scales(m)) for name, m in q.named_modules() if isinstance(m, QuantLinear)}


def noisy(model, errs: dict, seed: int, shaped: bool):
    """A copy of ``model`` with Gaussian noise added to each named linear's weight, of the Frobenius norm
    of that layer's error; ``shaped``: i.i.d. in the quantized layer's (smoothed, folded) domain, mapped
    back (the noise a quantizer of the smoothed weight makes), else i.i.d. in the FP domain."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, (n, rows, cols) in errs.items():
            layer = out.get_submodule(name)
            w = getattr(layer, "base_layer", layer).weight  # a peft-wrapped linear: its float weight
            e = torch.randn(w.shape, generator=g)
            if shaped:
                e = e * rows[:, None] / cols
            w.add_((e * n / e.norm()).to(w.dtype))
    return out


def with_lora(model, state=None):
    config = LoraConfig(r=4, lora_alpha=4 * SCALE, target_modules=TARGETS, init_lora_weights=False)
    m = inject_adapter_in_model(config, copy.deepcopy(model))
    if state is None:
        _random_lora(m)
    else:
        assert not set_peft_model_state_dict(m, state).unexpected_keys
    return m


def measure(family: str, seeds: int) -> list[tuple[str, float, float]]:
    """[(perturbation, PSNR(pert(FP), FP), PSNR(pert(FP+LoRA), FP+LoRA))]."""
    fp = FAMILIES[family]()
    calib = calibrate(fp)
    lora_fp = with_lora(fp)
    state = get_peft_model_state_dict(lora_fp)
    ref, ref_l = run(fp), run(lora_fp)
    peak = float(ref.abs().max())
    rows = []
    for label, wb, ab in (("W4A8", 4, 8), ("W8A16", 8, 16)):
        q = quantized(fp, calib, wb, ab)
        rows.append((label, psnr(run(q), ref, peak), psnr(run(with_lora(q, state)), ref_l, peak)))
        errs = errors(fp, q)
        for shaped in (False, True):
            plain, lora = [], []
            for seed in range(seeds):
                plain.append(psnr(run(noisy(fp, errs, seed, shaped)), ref, peak))
                lora.append(psnr(run(noisy(lora_fp, errs, seed, shaped)), ref_l, peak))  # the same noise, LoRA'd
            gaps = [p - lo for p, lo in zip(plain, lora)]
            rows.append((f"{'shaped' if shaped else 'noise'}({label})", sum(plain) / seeds, sum(lora) / seeds,
                         min(gaps), max(gaps)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'family':8} {'perturbation':14} {'FP dB':>7} {'FP+LoRA dB':>10} {'gap dB':>7}  (noise: mean of {args.seeds} "
          "seeds; gap range over seeds)")
    for family in args.families:
        for row in measure(family, args.seeds):
            extra = f"  [{row[3]:.1f}, {row[4]:.1f}]" if len(row) > 3 else ""
            print(f"{family:8} {row[0]:14} {row[1]:7.1f} {row[2]:10.1f} {row[1] - row[2]:7.1f}{extra}", flush=True)


if __name__ == "__main__":
    main()
