"""The diffusers-user checks of ``gpu_check.py`` on a tiny random bf16 PixArt-alpha pipeline.

What a diffusers user does with a quantized transformer, each run on a device and compared there:
(a) quantize the bf16 pipeline's transformer with ``ditas.quantize_`` and sample (PSNR of the
quantized latents vs the FP bf16 pipeline's); (b) ``pipe.save_pretrained`` ->
``DiffusionPipeline.from_pretrained`` gives bit-equal latents; (c) a peft LoRA made on the FP
transformer, applied to the quantized one (peft's ``inject_adapter_in_model``: diffusers gives
PixArt no LoRA loader), changes the output as on FP; (d) ``torch.compile`` of
the quantized transformer equals eager within bf16 rounding. The pipeline is built here (random
weights, a tokenizer built in code: nothing is downloaded), not taken from ``tests/``, so the
script runs wherever ditas and its ``pipelines`` / ``lora`` extras are installed.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

CAPTION = 32          # T5 width = the transformer's caption channels
PROMPTS = ["a red fox in the snow", "a blue house at night"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def tiny_pixart_pipeline(seed: int = 0):
    """A PixArt-alpha pipeline of random tiny parts (2 blocks of width 32, one-layer T5, one-level
    VAE): small enough for a CPU, built from diffusers' and transformers' own classes."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = sorted({w for p in PROMPTS for w in p.split()} | {"cat", "tree", "city"})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -2.0) for w in words]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=12)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=CAPTION, d_kv=16, d_ff=64, num_layers=1,
                                      num_heads=2, decoder_start_token_id=0)).eval()
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                           out_channels=8, num_layers=2, cross_attention_dim=32, sample_size=8,
                                           patch_size=2, caption_channels=CAPTION, norm_num_groups=1,
                                           use_additional_conditions=False)
    vae = AutoencoderKL(block_out_channels=[8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, steps: int = 4, seed: int = 5) -> torch.Tensor:
    """The pipeline's final latents for ``PROMPTS`` (the transformer's work, before the random VAE);
    the noise is drawn on the CPU, so every device starts from the same latents."""
    from ditas.pipelines import _call_kwargs

    with torch.no_grad():
        return pipe(prompt=PROMPTS, max_sequence_length=12, **_call_kwargs(pipe, steps, None, seed, None, None,
                                                                           "latent")).images.float().cpu()


def psnr_vs(a: torch.Tensor, ref: torch.Tensor, peak: float) -> float:
    from ditas.evaluation.metrics import psnr

    return psnr(a, ref, peak)


def load(folder: Path, device: torch.device, dtype: torch.dtype):
    """The pipeline in ``folder`` as a user loads it (``torch_dtype``: diffusers keeps in fp32
    what each model asks, T5's ``wo``), on ``device``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quantized_pipeline(folder: Path, device: torch.device, dtype: torch.dtype, quick: bool):
    """(FP pipeline, quantized pipeline) loaded from ``folder`` on ``device`` in ``dtype``: the
    second's transformer calibrated on one sampling run and quantized in place by the default
    W4A8 recipe."""
    import ditas

    fp, q = load(folder, device, dtype), load(folder, device, dtype)
    with ditas.record_calibration(q.transformer) as calib:
        latents(q, steps=3)
    cfg = ditas.recipe_config("ditas", lora_rank=4, lora_rounds=1 if quick else 3,
                              alpha_grid=(0.3, 0.5, 0.7) if quick else (0.1, 0.3, 0.5, 0.7, 0.9))
    ditas.quantize_(q.transformer, cfg, calib)
    return fp, q


def bf16_quality(fp, q) -> dict:
    """(a) PSNR of the quantized bf16 pipeline's latents vs the FP bf16 pipeline's."""
    ref, got = latents(fp), latents(q)
    peak = float(ref.abs().max())
    return {"fp": ref, "q": got, "peak": peak, "psnr": psnr_vs(got, ref, peak)}


def save_load(q, dtype: torch.dtype) -> dict:
    """(b) diffusers' own round trip of the quantized pipeline: the reloaded latents, bit for bit."""
    before = latents(q)
    with tempfile.TemporaryDirectory() as tmp:
        q.save_pretrained(Path(tmp) / "q")
        back = load(Path(tmp) / "q", q.transformer.device, dtype)
    quantized = sum(type(m).__name__ == "QuantLinear" for m in back.transformer.modules())
    after = latents(back)
    return {"max_diff": float((after - before).abs().max()), "equal": torch.equal(after, before),
            "layers": quantized}


def _random_adapter(transformer, seed: int = 3) -> None:
    """Random non-zero LoRA factors (peft starts lora_B at zero: an adapter that does nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.3 / p.shape[1] ** 0.5).to(p))


def lora(fp, q, base: dict) -> dict:
    """(c) a peft LoRA made on a copy of the FP transformer, its state dict put into a copy of the
    quantized transformer; both sampled (copies: the pipelines stay as they were)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    fp_lora = copy.deepcopy(fp)
    inject_adapter_in_model(config, fp_lora.transformer)
    _random_adapter(fp_lora.transformer)
    q_lora = copy.deepcopy(q)
    inject_adapter_in_model(config, q_lora.transformer)
    set_peft_model_state_dict(q_lora.transformer, get_peft_model_state_dict(fp_lora.transformer))
    lora_fp, lora_q = latents(fp_lora), latents(q_lora)
    peak = base["peak"]
    return {"max_diff": float((lora_q - lora_fp).abs().max()), "psnr_lora": psnr_vs(lora_q, lora_fp, peak),
            "psnr_base": base["psnr"], "change_fp": psnr_vs(lora_fp, base["fp"], peak),
            "change_q": psnr_vs(lora_q, base["q"], peak)}


def _transformer_inputs(transformer, seed: int = 9) -> dict:
    """One forward call's inputs for the tiny PixArt transformer, in its dtype and on its device."""
    g = torch.Generator().manual_seed(seed)
    c, dev, dt = transformer.config, transformer.device, transformer.dtype
    return dict(hidden_states=torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g).to(dev, dt),
                encoder_hidden_states=torch.randn(2, 6, CAPTION, generator=g).to(dev, dt),
                timestep=torch.tensor([900, 100], device=dev),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def compiled(q, backend: str = "inductor") -> dict:
    """(d) ``torch.compile`` (one graph, ``backend``) of the quantized transformer vs eager. The
    tolerance comes from the same run: how far the eager output moves when each input value moves
    by one step of the model's dtype (inductor's fused kernels keep fp32 between ops that eager
    rounds to bf16 after each: differences of that size, amplified as the model amplifies them)."""
    t = q.transformer
    kw = _transformer_inputs(t)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = t(**kw)[0].float()
        got = torch.compile(t, backend=backend, fullgraph=True)(**kw)[0].float()
        g = torch.Generator().manual_seed(1)
        x = kw["hidden_states"]
        nudged = x.float() * (1 + 2.0 ** -7 * torch.randn(x.shape, generator=g).sign().to(x.device))
        moved = t(**{**kw, "hidden_states": nudged.to(x.dtype)})[0].float()
    torch._dynamo.reset()
    scale = float(eager.norm())
    return {"max_diff": float((got - eager).abs().max()), "rel": float((got - eager).norm()) / scale,
            "floor": float((moved - eager).norm()) / scale}
