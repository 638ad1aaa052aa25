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
