"""A tiny random instance of every transformer model class of the installed diffusers.

For each class named by ``installed_classes()`` (the names of ``diffusers`` containing
``Transformer`` and ``Model``), ``ZOO`` holds a ``ZooEntry``: the ``__init__`` keywords of a
tiny model (a few heads of a few dims, one or two blocks of each kind) and a function giving
one forward call's keywords for a batch from a seed, written after the shapes diffusers' own
model tests use (``tests/models/transformers/test_models_transformer_*.py``); denoisers get a
timestep drawn from the seed, so different seeds are held-out inputs. A class for which no
small config could be made has ``reason`` instead.

``build(name, seed)`` makes the model with random, non-zero weights: diffusers initialises
adaLN modulations, gates and output projections to zero, which would make blocks the identity
and every quantization error vanish; like ``tests/family_models.py`` the zero parameters get
random values, and a few input columns of every linear are scaled up (the weight outliers of
trained transformers, what smoothing exists for). ``output_tensors(out)`` lists the tensors of
a forward's result. Importing this module imports nothing but torch; diffusers on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

Inputs = Callable[[torch.Generator, int], dict[str, Any]]


@dataclass(frozen=True)
class ZooEntry:
    """One class: its tiny config, its inputs, and the shape of its main output, or why none."""

    name: str
    init: dict[str, Any] = field(default_factory=dict)
    inputs: Inputs | None = None          # (generator, batch) -> forward keywords
    output_shape: Callable[[int], tuple[int, ...]] | None = None  # batch -> shape of output_tensors(out)[0]
    batch: int = 2
    reason: str | None = None             # set when no small config could be made


def installed_classes() -> list[str]:
    """The transformer model classes of the installed diffusers (the issue's list)."""
    import diffusers

    return sorted(n for n in dir(diffusers) if "Transformer" in n and "Model" in n)


def _n(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _t(g: torch.Generator, b: int) -> torch.Tensor:
    """A DDPM-style integer timestep per sample (0..999)."""
    return torch.randint(0, 1000, (b,), generator=g)


def _s(g: torch.Generator, b: int) -> torch.Tensor:
    """A flow-matching time per sample in (0, 1)."""
    return torch.rand(b, generator=g) * 0.9 + 0.05


def _ids(*sizes: int) -> torch.Tensor:
    """Integer position ids of a grid (one column per axis), as float, Flux-style."""
    return torch.cartesian_prod(*[torch.arange(s) for s in sizes]).float()


def _shape(*dims: int) -> Callable[[int], tuple[int, ...]]:
    return lambda b: (b, *dims)


def _entries() -> dict[str, ZooEntry]:
    """The zoo (one function so that the table reads top to bottom)."""
    e: dict[str, ZooEntry] = {}

    def add(name, init, inputs, out, batch=2):
        e[name] = ZooEntry(name, init, inputs, out, batch)

    def refuse(name, reason):
        e[name] = ZooEntry(name, reason=reason)

    add("AceStepTransformer1DModel",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, rope_theta=10000.0,
             sliding_window=16),
        lambda g, b: dict(hidden_states=_n(g, b, 8, 8), timestep=_s(g, b), timestep_r=_s(g, b),
                          encoder_hidden_states=_n(g, b, 10, 32), context_latents=_n(g, b, 8, 16)),
        _shape(8, 8))
    add("AllegroTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
             cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 2, 8, 8), encoder_hidden_states=_n(g, b, 16, 8),
                          timestep=_t(g, b)),
        _shape(4, 2, 8, 8))
    wan_like = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                    text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)
    add("AnyFlowTransformer3DModel", dict(wan_like, gate_value=0.25, deltatime_type="r"),
        lambda g, b: dict(hidden_states=_n(g, b, 2, 4, 16, 16), timestep=(_s(g, b) * 1000)[:, None].expand(b, 2),
                          r_timestep=(_s(g, b) * 500)[:, None].expand(b, 2), encoder_hidden_states=_n(g, b, 12, 16)),
        _shape(2, 4, 16, 16), batch=1)
    add("AnyFlowFARTransformer3DModel",
        dict(wan_like, compressed_patch_size=(1, 4, 4), full_chunk_limit=3, gate_value=0.25, deltatime_type="r"),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 4, 16, 16), timestep=(_s(g, b) * 1000)[:, None].expand(b, 4),
                          r_timestep=(_s(g, b) * 500)[:, None].expand(b, 4), encoder_hidden_states=_n(g, b, 12, 16),
                          chunk_partition=[2, 2]),
        _shape(4, 4, 16, 16), batch=1)
    add("AuraFlowTransformer2DModel",
        dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
             attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
             out_channels=4, pos_embed_max_size=64),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 16, 16), encoder_hidden_states=_n(g, b, 12, 32),
                          timestep=_t(g, b)),
        _shape(4, 16, 16))
    flux_ids = lambda: dict(img_ids=_ids(1, 4, 4), txt_ids=torch.zeros(12, 3))  # noqa: E731
    add("BriaTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]),
        lambda g, b: dict(hidden_states=_n(g, b, 16, 4), encoder_hidden_states=_n(g, b, 12, 32),
                          timestep=_s(g, b), **flux_ids()),
        _shape(16, 4))

    def fibo_inputs(g, b):
        text = _n(g, b, 12, 64)
        return dict(hidden_states=_n(g, b, 16, 8), encoder_hidden_states=text, timestep=_s(g, b),
                    text_encoder_layers=[text[:, :, :32], text[:, :, 32:]], **flux_ids())
    add("BriaFiboTransformer2DModel",
        dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None,
             axes_dims_rope=[0, 4, 4]),
        fibo_inputs, _shape(16, 8))
    add("ChromaTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8,
             approximator_hidden_dim=16, approximator_layers=1),
        lambda g, b: dict(hidden_states=_n(g, b, 16, 4), encoder_hidden_states=_n(g, b, 12, 32),
                          timestep=_s(g, b), **flux_ids()),
        _shape(16, 4))
    add("ChronoEditTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=8,
             text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64),
        lambda g, b: dict(hidden_states=_n(g, b, 8, 2, 8, 8), timestep=_t(g, b),
                          encoder_hidden_states=_n(g, b, 12, 32)),
        _shape(8, 2, 8, 8))
    cog = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
               text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
               temporal_compression_ratio=4, max_text_seq_length=8)
    add("CogVideoXTransformer3DModel", cog,
        lambda g, b: dict(hidden_states=_n(g, b, 1, 4, 8, 8), encoder_hidden_states=_n(g, b, 8, 8),
                          timestep=_t(g, b)),
        _shape(1, 4, 8, 8))

    def cogview_inputs(g, b):
        size = torch.tensor([[64, 64]] * b)
        return dict(hidden_states=_n(g, b, 4, 8, 8), encoder_hidden_states=_n(g, b, 8, 8), timestep=_t(g, b),
                    original_size=size, target_size=size, crop_coords=torch.zeros(b, 2, dtype=torch.long))
    add("CogView3PlusTransformer2DModel",
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
             text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8),
        cogview_inputs, _shape(4, 8, 8))
    add("CogView4Transformer2DModel",
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
             text_embed_dim=8, time_embed_dim=8, condition_dim=4),
        cogview_inputs, _shape(4, 8, 8))
    add("ConsisIDTransformer3DModel",
        dict(cog, num_layers=2, cross_attn_interval=1, is_kps=False, is_train_face=True, cross_attn_dim_head=1,
             cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2,
             LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1),
        lambda g, b: dict(hidden_states=_n(g, b, 1, 4, 8, 8), encoder_hidden_states=_n(g, b, 8, 8),
                          timestep=_t(g, b), id_vit_hidden=[_n(g, b, 2, 2)], id_cond=_n(g, b, 2)),
        _shape(1, 4, 8, 8))
    add("CosmosTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
             text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
             rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 1, 16, 16), timestep=_t(g, b),
                          encoder_hidden_states=_n(g, b, 12, 16), attention_mask=torch.ones(b, 12), fps=30),
        _shape(4, 1, 16, 16))
    add("DiTTransformer2DModel",
        dict(in_channels=4, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
             norm_type="ada_norm_zero", num_embeds_ada_norm=8, patch_size=2, sample_size=8, norm_num_groups=1),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 8, 8), timestep=_t(g, b),
                          class_labels=torch.randint(0, 4, (b,), generator=g)),
        _shape(8, 8, 8))
    add("EasyAnimateTransformer3DModel",
        dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
             out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
             time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 2, 16, 16), timestep=_t(g, b),
                          encoder_hidden_states=_n(g, b, 16, 16)),
        _shape(4, 2, 16, 16))
    add("ErnieImageTransformer2DModel",
        dict(hidden_size=16, num_attention_heads=2, num_layers=2, ffn_hidden_size=32, in_channels=8, out_channels=8,
             patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(4, 2, 2), eps=1e-6, qk_layernorm=True),
        lambda g, b: dict(hidden_states=_n(g, b, 8, 8, 8), timestep=_s(g, b) * 1000,
                          text_bth=_n(g, b, 12, 16), text_lens=torch.full((b,), 12)),
        _shape(8, 8, 8))
    add("FluxTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        lambda g, b: dict(hidden_states=_n(g, b, 16, 4), encoder_hidden_states=_n(g, b, 12, 32),
                          pooled_projections=_n(g, b, 32), timestep=_s(g, b), **flux_ids()),
        _shape(16, 4))

    def flux2_inputs(g, b):
        return dict(hidden_states=_n(g, b, 16, 4), encoder_hidden_states=_n(g, b, 12, 32),
                    img_ids=_ids(1, 4, 4, 1)[None].expand(b, -1, -1),
                    txt_ids=_ids(1, 1, 1, 12)[None].expand(b, -1, -1), timestep=_s(g, b),
                    guidance=torch.full((b,), 3.5))
    add("Flux2Transformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
             axes_dims_rope=[4, 4, 4, 4]),
        flux2_inputs, _shape(16, 4))
    add("GlmImageTransformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 8, 8), encoder_hidden_states=_n(g, b, 12, 32),
                          prior_token_id=torch.randint(0, 64, (b, 16), generator=g),
                          prior_token_drop=torch.zeros(b, 16, dtype=torch.bool), timestep=_t(g, b),
                          target_size=torch.tensor([[8.0, 8.0]] * b), crop_coords=torch.zeros(b, 2)),
        _shape(4, 8, 8))

    def helios_inputs(g, b):
        return dict(hidden_states=_n(g, b, 4, 2, 16, 16), timestep=_t(g, b), encoder_hidden_states=_n(g, b, 12, 16),
                    indices_hidden_states=torch.ones(b, 2), indices_latents_history_short=torch.ones(b, 1),
                    indices_latents_history_mid=torch.ones(b, 1), indices_latents_history_long=torch.ones(b, 4),
                    latents_history_short=_n(g, b, 4, 1, 16, 16), latents_history_mid=_n(g, b, 4, 1, 16, 16),
                    latents_history_long=_n(g, b, 4, 4, 16, 16))
    add("HeliosTransformer3DModel",
        dict({k: v for k, v in wan_like.items() if k != "rope_max_seq_len"}, qk_norm="rms_norm_across_heads",
             rope_dim=(4, 4, 4), has_multi_term_memory_patch=True, guidance_cross_attn=True,
             zero_history_timestep=True, is_amplify_history=False),
        helios_inputs, _shape(4, 2, 16, 16), batch=1)
    add("HiDreamImageTransformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
             num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
             force_inference_output=True),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 16, 16), encoder_hidden_states_t5=_n(g, b, 8, 8),
                          encoder_hidden_states_llama3=_n(g, 2, b, 8, 4), pooled_embeds=_n(g, b, 8),
                          timesteps=_t(g, b)),
        _shape(4, 16, 16))
    add("HunyuanImageTransformer2DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16,
             rope_axes_dim=(4, 4)),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 8, 8), timestep=_t(g, b).float(),
                          encoder_hidden_states=_n(g, b, 12, 16), encoder_attention_mask=torch.ones(b, 12)),
        _shape(4, 8, 8))
    add("HunyuanVideo15Transformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
             num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
             text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 1, 8, 8), timestep=_t(g, b).float(),
                          encoder_hidden_states=_n(g, b, 6, 16), encoder_hidden_states_2=_n(g, b, 4, 8),
                          encoder_attention_mask=torch.ones(b, 6), encoder_attention_mask_2=torch.ones(b, 4),
                          image_embeds=torch.zeros(b, 3, 12)),
        _shape(4, 1, 8, 8))
    hv = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
              num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
              text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None)
    add("HunyuanVideoTransformer3DModel", hv,
        lambda g, b: dict(hidden_states=_n(g, b, 4, 1, 8, 8), timestep=_t(g, b).float(),
                          encoder_hidden_states=_n(g, b, 12, 16), pooled_projections=_n(g, b, 8),
                          encoder_attention_mask=torch.ones(b, 12), guidance=torch.full((b,), 3500.0)),
        _shape(4, 1, 8, 8))

    def framepack_inputs(g, b):
        return dict(hidden_states=_n(g, b, 4, 3, 4, 4), timestep=_t(g, b), encoder_hidden_states=_n(g, b, 12, 16),
                    pooled_projections=_n(g, b, 8), encoder_attention_mask=torch.ones(b, 12),
                    guidance=torch.full((b,), 3500.0), image_embeds=_n(g, b, 12, 16), indices_latents=torch.ones(3),
                    latents_clean=_n(g, b, 4, 2, 4, 4), indices_latents_clean=torch.ones(2),
                    latents_history_2x=_n(g, b, 4, 2, 4, 4), indices_latents_history_2x=torch.ones(2),
                    latents_history_4x=_n(g, b, 4, 8, 4, 4), indices_latents_history_4x=torch.ones(8))
    add("HunyuanVideoFramepackTransformer3DModel",
        dict(hv, patch_size=2, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
        framepack_inputs, _shape(4, 3, 4, 4), batch=1)
    def ideogram_inputs(g, b):
        from diffusers.models.transformers.transformer_ideogram4 import (IMAGE_POSITION_OFFSET,
                                                                         LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR)
        text, image = 4, 4  # text tokens then a 2x2 image, one packed sequence
        hidden = torch.zeros(b, text + image, 16)
        hidden[:, text:] = _n(g, b, image, 16)
        llm = torch.zeros(b, text + image, 24)
        llm[:, :text] = _n(g, b, text, 24)
        pos = torch.zeros(b, text + image, 3, dtype=torch.long)
        pos[:, :text] = torch.arange(text)[:, None]
        pos[:, text:, 0] = IMAGE_POSITION_OFFSET
        pos[:, text:, 1] = torch.tensor([0, 0, 1, 1]) + IMAGE_POSITION_OFFSET
        pos[:, text:, 2] = torch.tensor([0, 1, 0, 1]) + IMAGE_POSITION_OFFSET
        indicator = torch.full((b, text + image), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
        indicator[:, :text] = LLM_TOKEN_INDICATOR
        return dict(hidden_states=hidden, encoder_hidden_states=llm, timestep=_s(g, b), position_ids=pos,
                    segment_ids=torch.ones(b, text + image, dtype=torch.long), indicator=indicator)
    add("Ideogram4Transformer2DModel",
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32,
             adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1)),
        ideogram_inputs, _shape(8, 16))
    joy = dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
               rope_dim_list=[4, 6, 6], theta=256)
    add("JoyImageEditTransformer3DModel", joy,
        lambda g, b: dict(hidden_states=_n(g, b, 16, 1, 4, 4), encoder_hidden_states=_n(g, b, 12, 16),
                          timestep=_s(g, b)),
        _shape(16, 1, 4, 4), batch=1)
    add("JoyImageEditPlusTransformer3DModel", joy,
        lambda g, b: dict(hidden_states=_n(g, b, 2, 16, 1, 2, 2), encoder_hidden_states=_n(g, b, 12, 16),
                          timestep=_s(g, b), shape_list=[[(1, 1, 1), (1, 1, 1)]] * b),
        _shape(2, 16, 1, 2, 2), batch=1)
    add("Kandinsky5Transformer3DModel",
        dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
             model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
        lambda g, b: dict(hidden_states=_n(g, b, 1, 8, 8, 4), encoder_hidden_states=_n(g, b, 6, 16),
                          pooled_projections=_n(g, b, 8), timestep=_s(g, b) * 1000,
                          visual_rope_pos=[torch.arange(1), torch.arange(4), torch.arange(4)],
                          text_rope_pos=torch.arange(6)),
        _shape(1, 8, 8, 4), batch=1)
    add("Kandinsky6Transformer3DModel",
        dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
             model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False),
        lambda g, b: dict(hidden_states=_n(g, b, 1, 8, 8, 4), encoder_hidden_states=_n(g, b, 6, 16),
                          pooled_projections=_n(g, b, 8), timestep=_s(g, b) * 1000),
        _shape(1, 8, 8, 4), batch=1)
    krea_tokens = 4
    add("Krea2Transformer2DModel",
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
             text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
             num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2)),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 16), encoder_hidden_states=_n(g, b, krea_tokens, 3, 16),
                          timestep=_s(g, b),
                          position_ids=torch.cat([torch.zeros(krea_tokens, 3), _ids(1, 2, 2)]),
                          encoder_attention_mask=torch.ones(b, krea_tokens, dtype=torch.bool)),
        _shape(4, 16), batch=1)
    ltx2 = dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2,
                qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False)
    add("LTX2VideoTransformer3DModel", ltx2,
        lambda g, b: dict(hidden_states=_n(g, b, 2 * 8 * 8, 4), audio_hidden_states=_n(g, b, 9, 4),
                          encoder_hidden_states=_n(g, b, 8, 16), audio_encoder_hidden_states=_n(g, b, 8, 16),
                          timestep=_t(g, b).float(), encoder_attention_mask=torch.ones(b, 8, dtype=torch.bool),
                          num_frames=2, height=8, width=8, audio_num_frames=9, fps=25.0),
        _shape(128, 4))
    add("LTXVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
             num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16),
        lambda g, b: dict(hidden_states=_n(g, b, 2 * 8 * 8, 4), encoder_hidden_states=_n(g, b, 8, 16),
                          timestep=_t(g, b), encoder_attention_mask=torch.ones(b, 8, dtype=torch.bool),
                          num_frames=2, height=8, width=8),
        _shape(128, 4))
    add("LatteTransformer3DModel",
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
             caption_channels=8, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6, video_length=2),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 2, 8, 8), encoder_hidden_states=_n(g, b, 8, 8),
                          timestep=_t(g, b), enable_temporal_attentions=True),
        _shape(8, 2, 8, 8))
    add("LongCatImageTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        lambda g, b: dict(hidden_states=_n(g, b, 16, 4), encoder_hidden_states=_n(g, b, 12, 32), timestep=_s(g, b),
                          guidance=torch.full((b,), 3.5), **flux_ids()),
        _shape(16, 4))
    add("Lumina2Transformer2DModel",
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
             num_attention_heads=3, num_kv_heads=1, multiple_of=2, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128),
             cap_feat_dim=32),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 16, 16), encoder_hidden_states=_n(g, b, 16, 32),
                          timestep=_s(g, b), encoder_attention_mask=torch.ones(b, 16, dtype=torch.bool)),
        _shape(4, 16, 16))

    def minimax_h3_inputs(g, b):
        text, audio, video = 4, 6, 8
        n = text + audio + video
        ti, ai, vi = torch.arange(text), torch.arange(text, text + audio), torch.arange(text + audio, n)
        tags = torch.zeros(n, dtype=torch.long)
        tags[ti], tags[ai] = 1, 2  # 0 video, 1 text, 2 audio
        t_index = torch.zeros(n, dtype=torch.long)
        t_index[ai] = 1
        pos = torch.zeros(n, 3)
        pos[:, 0] = torch.arange(n)
        pos[vi, 1] = torch.arange(video).float() % 4
        pos[vi, 2] = torch.arange(video).float() % 2
        return dict(hidden_states=_n(g, b, video, 16), audio_hidden_states=_n(g, b, audio, 6),
                    encoder_hidden_states=_n(g, b, text, 8), timestep=_s(g, 2), timestep_indices=t_index,
                    token_tags=tags, position_ids=pos, video_indices=vi, audio_indices=ai, text_indices=ti)
    add("MiniMaxH3Transformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=2,
             ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8,
             time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2),
        minimax_h3_inputs, _shape(8, 16))
    add("MiniMaxMusic3Transformer1DModel",
        dict(in_channels=8, condition_dim=16, num_layers=2, num_attention_heads=2, attention_head_dim=8,
             ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=8),
        lambda g, b: dict(hidden_states=_n(g, b, 8, 24), encoder_hidden_states=_n(g, b, 24, 16), timestep=_s(g, b)),
        _shape(8, 24))
    add("MochiTransformer3DModel",
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
             in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
             activation_fn="swiglu", max_sequence_length=16),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 2, 8, 8), encoder_hidden_states=_n(g, b, 16, 16),
                          timestep=_t(g, b), encoder_attention_mask=torch.ones(b, 16, dtype=torch.bool)),
        _shape(4, 2, 8, 8))
    add("MotifVideoTransformer3DModel",
        dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
             num_single_layers=1, num_decoder_layers=0, patch_size=1, patch_size_t=1, text_embed_dim=32,
             image_embed_dim=4, rope_axes_dim=(4, 4, 4)),
        lambda g, b: dict(hidden_states=_n(g, b, 9, 3, 8, 8), encoder_hidden_states=_n(g, b, 12, 32),
                          timestep=_t(g, b)),
        _shape(4, 3, 8, 8), batch=1)
    qwen = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
    qwen_inputs = lambda g, b: dict(  # noqa: E731
        hidden_states=_n(g, b, 16, 16), encoder_hidden_states=_n(g, b, 8, 16),
        encoder_hidden_states_mask=torch.ones(b, 8, dtype=torch.long), timestep=_s(g, b), img_shapes=[(1, 4, 4)] * b)
    # the dense MLP is int(dim * mlp_ratio * 2 / 3) rounded down to 128s: ratio 6 gives it 128 channels, not 0
    add("NucleusMoEImageTransformer2DModel", dict(qwen, moe_enabled=False, mlp_ratio=6.0), qwen_inputs, _shape(16, 16))
    add("QwenImageTransformer2DModel", dict(qwen, guidance_embeds=False), qwen_inputs, _shape(16, 16))

    def omnigen_inputs(g, b):
        text, image_tokens = 24, 16
        n = text + 1 + image_tokens
        return dict(hidden_states=_n(g, b, 4, 8, 8), timestep=_s(g, b),
                    input_ids=torch.randint(0, 10, (b, text), generator=g), input_img_latents=[_n(g, 1, 4, 8, 8)],
                    input_image_sizes={0: [[0, image_tokens]]}, attention_mask=torch.ones(b, n, n),
                    position_ids=torch.arange(n).repeat(b, 1))
    add("OmniGenTransformer2DModel",
        dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2,
             pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
             rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]}),
        omnigen_inputs, _shape(4, 8, 8))
    add("OvisImageTransformer2DModel",
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
        lambda g, b: dict(hidden_states=_n(g, b, 16, 4), encoder_hidden_states=_n(g, b, 12, 32), timestep=_s(g, b),
                          **flux_ids()),
        _shape(16, 4))
    add("PRXTransformer2DModel",
        dict(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
             axes_dim=[8, 8]),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 8, 8), encoder_hidden_states=_n(g, b, 8, 16), timestep=_s(g, b)),
        _shape(4, 8, 8))
    add("PixArtTransformer2DModel",
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
             cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
             num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
             use_additional_conditions=False, caption_channels=8, norm_num_groups=1),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 8, 8), timestep=_t(g, b), encoder_hidden_states=_n(g, b, 8, 8),
                          added_cond_kwargs={"aspect_ratio": None, "resolution": None}),
        _shape(8, 8, 8))
    add("SD3Transformer2DModel",
        dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
             pos_embed_max_size=16),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 16, 16), encoder_hidden_states=_n(g, b, 12, 32),
                          pooled_projections=_n(g, b, 16), timestep=_t(g, b)),
        _shape(4, 16, 16))
    add("SanaTransformer2DModel",
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
             sample_size=8),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 8, 8), encoder_hidden_states=_n(g, b, 8, 8), timestep=_t(g, b)),
        _shape(4, 8, 8))
    add("SanaVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
             sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 2, 8, 8), encoder_hidden_states=_n(g, b, 12, 16),
                          timestep=_t(g, b)),
        _shape(4, 2, 8, 8))
    wan_inputs = lambda g, b: dict(  # noqa: E731
        hidden_states=_n(g, b, 4, 2, 8, 8), encoder_hidden_states=_n(g, b, 12, 16), timestep=_t(g, b))
    add("SkyReelsV2Transformer3DModel", dict(wan_like, qk_norm="rms_norm_across_heads"), wan_inputs,
        _shape(4, 2, 8, 8))
    # the continuous-input 2D transformer of the U-Nets (and its DreamLite counterpart): no timestep
    t2d = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
               norm_num_groups=1, cross_attention_dim=16)
    t2d_inputs = lambda g, b: dict(hidden_states=_n(g, b, 4, 8, 8), encoder_hidden_states=_n(g, b, 8, 16))  # noqa: E731
    add("Transformer2DModel", t2d, t2d_inputs, _shape(4, 8, 8))
    add("DreamLiteTransformer2DModel", t2d, t2d_inputs, _shape(4, 8, 8))
    add("TransformerTemporalModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, norm_num_groups=1),
        lambda g, b: dict(hidden_states=_n(g, b * 2, 4, 8, 8), num_frames=2),
        lambda b: (b * 2, 4, 8, 8))
    add("WanTransformer3DModel", dict(wan_like, qk_norm="rms_norm_across_heads"), wan_inputs, _shape(4, 2, 8, 8))
    add("WanVACETransformer3DModel",
        dict(wan_like, qk_norm="rms_norm_across_heads", num_layers=4, vace_layers=[0, 2], vace_in_channels=12),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 2, 8, 8), encoder_hidden_states=_n(g, b, 12, 16),
                          control_hidden_states=_n(g, b, 12, 2, 8, 8), timestep=_t(g, b)),
        _shape(4, 2, 8, 8))

    def wan_animate_inputs(g, b):
        return dict(hidden_states=_n(g, b, 12, 21, 8, 8), timestep=_t(g, b), encoder_hidden_states=_n(g, b, 12, 16),
                    encoder_hidden_states_image=_n(g, b, 12, 16), pose_hidden_states=_n(g, b, 4, 20, 8, 8),
                    face_pixel_values=_n(g, b, 3, 77, 16, 16))
    add("WanAnimateTransformer3DModel",
        dict(wan_like, qk_norm="rms_norm_across_heads", in_channels=12, latent_channels=4, image_dim=16,
             motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
             motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
             inject_face_latents_blocks=2),
        wan_animate_inputs, _shape(4, 21, 8, 8), batch=1)
    add("ZImageTransformer2DModel",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
             n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]),
        lambda g, b: dict(x=[_n(g, 4, 1, 8, 8) for _ in range(b)], cap_feats=[_n(g, 8, 16) for _ in range(b)],
                          t=_s(g, b)),
        lambda b: (4, 1, 8, 8))
    add("Flux3Transformer2DModel",
        dict(in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4)),
        lambda g, b: dict(hidden_states=_n(g, b, 16, 4), encoder_hidden_states=_n(g, b, 12, 32), timestep=_s(g, b),
                          img_ids=_ids(1, 4, 4, 1), txt_ids=_ids(1, 1, 1, 12)),
        _shape(16, 4))
    add("Kandinsky6SRTransformer3DModel",
        dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=32, ff_dim=64,
             num_visual_blocks=2, axes_dims=(4, 6, 6), nabla_window=(3, 3, 3)),
        lambda g, b: dict(hidden_states=_n(g, b, 1, 8, 8, 9), timestep=_s(g, b) * 1000),
        _shape(1, 8, 8, 4), batch=1)

    def qwen21_inputs(g, b):
        text = 6  # text tokens, then the target image's 4 slots of 2x2 latent tokens
        return dict(hidden_states=_n(g, b, 16, 16), encoder_hidden_states=_n(g, b, text, 16), timestep=_s(g, b),
                    img_shapes=[[(1, 4, 4)]] * b,
                    img_mask=torch.cat([torch.zeros(b, text, dtype=torch.bool), torch.ones(b, 4, dtype=torch.bool)], 1))
    add("QwenImage21Transformer2DModel",
        dict(patch_size=1, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             context_in_dim=16, mlp_ratio=2, axes_dims_rope=(8, 4, 4)),
        qwen21_inputs, _shape(22, 4))  # the joint sequence comes back: 6 text + 16 image tokens
    add("SanaWMTransformer3DModel",
        dict(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, softmax_every_n=2,
             linear_head_dim=16, use_chunk_plucker_post_attn=False, chunk_plucker_post_attn_blocks=0,
             image_size=64, caption_channels=16, fp32_attention=False, mixed_precision="fp32"),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 2, 8, 8), timestep=(_s(g, b) * 1000)[:, None, None].expand(b, 1, 2),
                          encoder_hidden_states=_n(g, b, 1, 8, 16), encoder_attention_mask=torch.ones(b, 8)),
        _shape(4, 2, 8, 8))

    def refiner_inputs(g, b):
        import diffusers
        rope_model = diffusers.SanaWMLTX2RefinerTransformer3DModel(**e["SanaWMLTX2RefinerTransformer3DModel"].init)
        rope = rope_model.build_rotary_emb_for_absolute_positions(batch_size=b, frame_positions=[0, 1], height=8,
                                                                   width=8, device="cpu", fps=24.0)
        return dict(hidden_states=_n(g, b, 2 * 8 * 8, 4), encoder_hidden_states=_n(g, b, 8, 16),
                    timestep=(_s(g, b) * 1000)[:, None].expand(b, 128), video_rotary_emb=rope,
                    encoder_attention_mask=torch.ones(b, 8, dtype=torch.bool))
    add("SanaWMLTX2RefinerTransformer3DModel", dict(ltx2, num_layers=2), refiner_inputs, _shape(128, 4))

    def wan_animate2_inputs(g, b):
        from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
        frames, h, w = 2, 4, 4
        return dict(hidden_states=[_n(g, 16, frames, h, w) for _ in range(b)], timestep=_s(g, 1) * 1000,
                    encoder_hidden_states=[_n(g, 8, 32) for _ in range(b)],
                    condition_latents=[_n(g, 20, frames, h, w) for _ in range(b)],
                    encoder_hidden_states_image=_n(g, b, 4, 1280), kv_cache=WanAnimate2KVCache(2),
                    kv_cache_mode="extract", seq_len=frames * (h // 2) * (w // 2),
                    offset_grid_sizes=torch.tensor([[frames, h // 2, w // 2]]))
    add("WanAnimate2Transformer3DModel",
        dict(patch_size=(1, 2, 2), text_len=16, in_dim=36, dim=32, ffn_dim=64, freq_dim=64, text_dim=32, out_dim=16,
             num_heads=2, num_layers=2, cross_attn_norm=True, use_img_emb=True),
        wan_animate2_inputs, lambda b: (16, 2, 4, 4), batch=1)
    add("BriaFibo2Transformer2DModel",
        dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
             injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
             gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32)),
        lambda g, b: dict(hidden_states=_n(g, b, 4, 8, 8), timestep=_s(g, b), encoder_hidden_states=_n(g, b, 2, 8, 16)),
        _shape(4, 8, 8))
    return e


ZOO: dict[str, ZooEntry] = _entries()


def build(name: str, seed: int = 0) -> nn.Module:
    """The tiny model of ``name`` (eval mode, float32), with random non-zero weights from ``seed``."""
    import diffusers

    entry = ZOO[name]
    if entry.reason:
        raise ValueError(f"{name}: {entry.reason}")
    torch.manual_seed(seed)
    model = getattr(diffusers, name)(**entry.init)
    return randomize(model, seed)


def randomize(model: nn.Module, seed: int = 0, channels: int = 2, factor: float = 6.0) -> nn.Module:
    """Random values for the parameters diffusers initialises to zero (so no block is the identity
    and no gate hides an error), then ``channels`` input columns of every ``nn.Linear`` scaled by
    ``factor`` (weight outliers). Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.is_floating_point():
                continue
            if p.numel() and torch.count_nonzero(p) == 0:
                fan_in = p.shape[-1] if p.ndim >= 2 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / fan_in ** 0.5 if p.ndim >= 2 else 0.05))
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.in_features > channels:
                cols = torch.randperm(m.in_features, generator=g)[:channels]
                m.weight[:, cols] *= factor
    return model.eval()


def inputs(name: str, seed: int, batch: int | None = None) -> dict[str, Any]:
    """One forward call's keywords for ``name`` from ``seed`` (a fresh generator: same seed, same inputs)."""
    entry = ZOO[name]
    g = torch.Generator().manual_seed(seed)
    return entry.inputs(g, entry.batch if batch is None else batch)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a forward's result (a tensor, a tuple/list, or a diffusers ``BaseOutput``), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    return []
