"""Tiny random diffusers transformers of the PixArt, SD3 and Flux families (not a test module).

Each builder makes a 2-layer model with 2 heads of 8 dims, gives the zero-initialised layers
(adaLN, output projections) random weights so that no block is the identity, and scales a few
input channels of every linear up: trained transformers have such outlier channels, and they are
what smoothing exists for. ``call_kwargs`` gives one forward call's inputs for a batch.
"""

from __future__ import annotations

import torch
from torch import nn

HEADS, HEAD_DIM = 2, 8
DIM = HEADS * HEAD_DIM
TEXT_DIM, TEXT_TOKENS, POOLED_DIM = 24, 5, 12


_SOFTMAX_INPUTS = ("to_q", "to_k", "add_q_proj", "add_k_proj")
_FEEDS_A_LINEAR = ("to_v", "add_v_proj", "ff.net.0.proj", "ff_context.net.0.proj", "proj_mlp")


def _is_modulation(name: str) -> bool:
    """adaLN modulation and timestep embedding linears (module or parameter name)."""
    parts = name.removesuffix(".weight").removesuffix(".bias").split(".")
    return parts[0] in ("adaln_single", "time_text_embed") or (len(parts) > 1 and parts[-2].startswith("norm"))


def add_outliers(model: nn.Module, seed: int = 0, channels: int = 2, factor: float = 6.0) -> nn.Module:
    """Random non-zero weights everywhere (adaLN and q/k projections with a smaller gain), then
    ``channels`` input columns of every linear inside the blocks scaled by ``factor`` (weight
    outliers) and ``channels`` output rows of the linears whose output another linear reads
    (``to_v``, the MLPs' first linears) scaled by ``factor``: activation outliers in the attention
    outputs and MLP hidden states. The channels differ per linear."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                # adaLN: modest shift/scale/gate; q/k: soft attention (both as in trained models)
                gain = 0.3 if _is_modulation(name) or name.split(".")[-2:][0] in _SOFTMAX_INPUTS else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "scale_shift_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and "blocks" in name:
                cols = torch.randperm(m.in_features, generator=g)[:channels]
                m.weight[:, cols] *= factor
                if not name.endswith(_FEEDS_A_LINEAR):
                    continue  # only where a linear reads the output (not softmax inputs, not the residual stream)
                rows = torch.randperm(m.out_features, generator=g)[:channels]
                m.weight[rows] *= factor
                if m.bias is not None:
                    m.bias[rows] *= factor
    return model.eval()


def tiny_pixart(seed: int = 0, layers: int = 2):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                 out_channels=8, num_layers=layers, cross_attention_dim=DIM, sample_size=8,
                                 patch_size=2, caption_channels=TEXT_DIM, norm_num_groups=1,
                                 use_additional_conditions=False)
    return add_outliers(m, seed)


def tiny_sd3(seed: int = 0, layers: int = 2, dual_attention_layers: tuple[int, ...] = ()):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=layers,
                              attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
                              caption_projection_dim=DIM, pooled_projection_dim=POOLED_DIM, out_channels=4,
                              pos_embed_max_size=8, dual_attention_layers=dual_attention_layers,
                              qk_norm="rms_norm" if dual_attention_layers else None)
    return add_outliers(m, seed)


def tiny_flux(seed: int = 0, layers: int = 1, single_layers: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=layers, num_single_layers=single_layers,
                               attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
                               pooled_projection_dim=POOLED_DIM, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    return add_outliers(m, seed)


def call_kwargs(model: nn.Module, batch: int = 2, seed: int = 0, step: int = 0) -> dict:
    """One forward call's keyword arguments for ``model`` (text states and latents at random;
    ``step`` picks the timestep, high first, as a sampler would)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    kind = type(model).__name__
    text = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g)
    t = 900.0 - 300.0 * step
    if kind == "PixArtTransformer2DModel":
        c = model.config
        x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
        return dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((batch,), t),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    if kind == "SD3Transformer2DModel":
        c = model.config
        x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=torch.randn(batch, POOLED_DIM,
                    generator=g), timestep=torch.full((batch,), t), return_dict=False)
    if kind == "FluxTransformer2DModel":
        c = model.config
        side = 4
        x = torch.randn(batch, side * side, c.in_channels, generator=g)
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=torch.randn(batch, POOLED_DIM,
                    generator=g), timestep=torch.full((batch,), t / 1000), img_ids=img_ids.reshape(-1, 3),
                    txt_ids=torch.zeros(TEXT_TOKENS, 3), return_dict=False)
    raise TypeError(f"no inputs for {kind}")


FAMILIES = {"pixart": tiny_pixart, "sd3": tiny_sd3, "flux": tiny_flux}


def save_tiny_pixart_pipeline(path, seed: int = 0) -> None:
    """A complete PixArt-alpha pipeline folder, all random and tiny: T5 text encoder (1 layer),
    a T5 tokenizer built in code from a 40-piece vocabulary (no download), a 1-level VAE, the
    tiny PixArt transformer and a DPM-Solver++ scheduler."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = ("a an the of in on with and photo painting portrait close-up city sky tree house river mountain "
             "cat dog fox bird red blue green golden night morning light snow forest").split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in words]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, decoder_start_token_id=0)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], block_out_channels=[8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=tiny_pixart(seed), scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(str(path))


_WORDS = "a photo of the cat dog fox red blue tree house in snow city night painting".split()


def _clip(hidden: int, projection: int | None = None):
    """A 1-layer CLIP text encoder (with projection if ``projection``) and its BPE tokenizer
    built from a word-and-letter vocabulary (no download)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in _WORDS:
        vocab[w + "</w>"] = len(vocab)
    for ch in sorted(set("".join(_WORDS))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tokenizer, (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5():
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in _WORDS]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=16)
    model = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1,
                                    num_heads=2, decoder_start_token_id=0)).eval()
    return tokenizer, model


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D"], block_out_channels=[8], layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=8, shift_factor=0.0)


def save_tiny_sd3_pipeline(path, seed: int = 0) -> None:
    """A Stable Diffusion 3 pipeline folder, all random and tiny: two CLIP text encoders with
    projection (12 wide each: their states fill the 24-wide joint attention input, their pooled
    outputs the 12-wide pooled projection), no T5 (``text_encoder_3=None``, as SD3 allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    (tok1, enc1), (tok2, enc2) = _clip(TEXT_DIM // 2, POOLED_DIM // 2), _clip(TEXT_DIM // 2, POOLED_DIM // 2)
    pipe = StableDiffusion3Pipeline(transformer=tiny_sd3(seed), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(4), text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2,
                                    tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(path))


def save_tiny_flux_pipeline(path, seed: int = 0) -> None:
    """A Flux.1 pipeline folder, all random and tiny: CLIP (pooled, 12 wide) and T5 (24 wide)
    text encoders, a VAE with 2 latent channels (packed 2x2 into the transformer's 8)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    (tok1, enc1), (tok2, enc2) = _clip(POOLED_DIM), _t5()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(2), text_encoder=enc1, tokenizer=tok1,
                        text_encoder_2=enc2, tokenizer_2=tok2, transformer=tiny_flux(seed))
    pipe.save_pretrained(str(path))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative (norm) error of ``a`` against ``b``, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def record(model: nn.Module, steps: int = 3, seed: int = 1):
    """A calibration record of ``steps`` calls of ``model`` (inputs of ``call_kwargs``)."""
    from ditas.calibration.recording import record_calibration

    with torch.no_grad(), record_calibration(model) as calib:
        for step in range(steps):
            model(**call_kwargs(model, seed=seed, step=step))
    return calib


def outputs(model: nn.Module, seed: int = 7, steps: int = 3) -> list[torch.Tensor]:
    """The model's first outputs on ``steps`` held-out calls (another seed than ``record``'s)."""
    with torch.no_grad():
        return [model(**call_kwargs(model, seed=seed, step=s))[0] for s in range(steps)]
