"""The denoiser: a diffusers UNet2DConditionModel that cross-attends to the text encoder's token states."""
from __future__ import annotations

from diffusers import UNet2DConditionModel

from t2i.config import UNetConfig


def build_unet(config: UNetConfig, latent_channels: int, cross_attention_dim: int,
               latent_size: int, learned_variance: bool = False) -> UNet2DConditionModel:
    """With `learned_variance`, the output carries a variance channel per latent channel (t2i.diffusion.vlb)."""
    out_channels = 2 * latent_channels if learned_variance else latent_channels
    return conditional_unet(config, latent_size, latent_channels, out_channels, cross_attention_dim)


def conditional_unet(config, sample_size: int, in_channels: int, out_channels: int, cross_attention_dim: int,
                     **settings) -> UNet2DConditionModel:
    """A UNet2DConditionModel of `config`'s levels (a UNetConfig or anything with its fields, such as SRConfig),
    cross-attending where `config.cross_attention` says; `settings` go to diffusers as they are."""
    down = tuple("CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in config.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(config.cross_attention))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        # diffusers reads `attention_head_dim` as the number of heads here (diffusers issue #2011).
        attention_head_dim=config.attention_heads,
        **settings,
    )
