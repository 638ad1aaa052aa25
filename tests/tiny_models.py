"""Tiny random-weight diffusers models for pipelines built offline in the tests (and the replay benchmark)."""

from __future__ import annotations

import diffusers
import torch


def tiny_vae() -> diffusers.AutoencoderKL:
    """A one-block VAE with random weights: 4 latent channels, no downsampling."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        sample_size=8,
    ).eval()


def tiny_cond_unet(**extra) -> diffusers.UNet2DConditionModel:
    """A cross-attention UNet with small random weights (``extra``: SDXL's added conditioning)."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2, **extra,
    ).eval()


def tiny_sdxl_unet() -> diffusers.UNet2DConditionModel:
    """:func:`tiny_cond_unet` with SDXL's added conditioning (pooled text embeddings and time ids)."""
    return tiny_cond_unet(
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 + 6 * 4
    )


def tiny_flow_vae() -> diffusers.AutoencoderKL:
    """:func:`tiny_vae` with the latent shift factor FLUX.1 and SD3 pipelines read."""
    return diffusers.AutoencoderKL(**{**tiny_vae().config, "shift_factor": 0.0})


def tiny_flux_transformer() -> diffusers.FluxTransformer2DModel:
    """FLUX.1's transformer with small random weights (guidance embedding on)."""
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()


# FLUX.1's scheduler config, with image sequence lengths scaled to the tiny latents (dynamic shifting from mu).
FLUX_SCHEDULER = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)


def tiny_sd3_transformer() -> diffusers.SD3Transformer2DModel:
    """Stable Diffusion 3's transformer with small random weights."""
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
        pos_embed_max_size=8,
    ).eval()


def tiny_cogvideox_transformer() -> diffusers.CogVideoXTransformer3DModel:
    """CogVideoX's 3D transformer with small random weights (9 frames of 16x16 pixels, 8 text tokens of 16)."""
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()


def tiny_cogvideox_vae() -> diffusers.AutoencoderKLCogVideoX:
    """CogVideoX's video VAE with small random weights (4 latent channels, 4x temporal compression)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()


def tiny_ltx_transformer() -> diffusers.LTXVideoTransformer3DModel:
    """LTX-Video's transformer with small random weights (8 latent channels, text tokens of 16)."""
    torch.manual_seed(0)
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16,
    ).eval()


def tiny_ltx_vae() -> diffusers.AutoencoderKLLTXVideo:
    """LTX-Video's video VAE with small random weights (8 latent channels, 4x spatial and temporal compression)."""
    torch.manual_seed(0)
    ones = (1, 1, 1, 1, 1)
    return diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=ones, decoder_layers_per_block=ones,
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()


def pooled_embeds(g: torch.Generator) -> dict:
    """Prompt and negative prompt embeddings with pooled ones, as FLUX.1 and SD3 pipelines take them."""
    return {"prompt_embeds": torch.randn(1, 5, 12, generator=g), "pooled_prompt_embeds": torch.randn(1, 6, generator=g),
            "negative_prompt_embeds": torch.randn(1, 5, 12, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(1, 6, generator=g)}


def stable_diffusion_call(kind: str, steps: int) -> tuple[type, dict]:
    """A Stable Diffusion pipeline class (``txt2img``, ``img2img`` or ``inpaint``) and its call's keywords: guided,
    on fixed random embeddings, an 8x8 image and mask where the pipeline takes them (img2img and inpainting start
    part-way through the schedule)."""
    embeds = [torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    kwargs = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=steps,
                  guidance_scale=7.5, output_type="np")
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    if kind == "img2img":
        return diffusers.StableDiffusionImg2ImgPipeline, kwargs | dict(image=image, strength=0.6)
    if kind == "inpaint":
        mask = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.5).float()
        return diffusers.StableDiffusionInpaintPipeline, kwargs | dict(image=image, mask_image=mask, strength=0.8)
    return diffusers.StableDiffusionPipeline, kwargs | dict(height=8, width=8)


def stable_diffusion_images(pipe_cls: type, scheduler, kwargs: dict, vae, unet):
    """The images of a tiny Stable Diffusion pipeline (no text encoder or safety checker) with ``scheduler``."""
    pipe = pipe_cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


def tiny_sana_transformer() -> diffusers.SanaTransformer2DModel:
    """Sana's linear-attention transformer with small random weights (4 latent channels, text tokens of 8)."""
    torch.manual_seed(0)
    return diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8,
    ).eval()


def tiny_wan_transformer() -> diffusers.WanTransformer3DModel:
    """Wan 2.1's video transformer with small random weights (4 latent channels, text tokens of 16)."""
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=16, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
