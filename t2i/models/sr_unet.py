"""The super-resolution denoiser: a stock diffusers UNet2DConditionModel whose input is the noisy high-resolution
image and the upsampled low-resolution one side by side on channels (after space-to-depth, when patch_size > 1),
with cross-attention on the text and a timestep-style class embedding of the conditioning noise level."""
from __future__ import annotations

from diffusers import UNet2DConditionModel

from t2i.config import SRConfig

RGB = 3


def build_sr_unet(config: SRConfig, cross_attention_dim: int, high_resolution: int) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in config.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(config.cross_attention))
    image_channels = RGB * config.patch_size ** 2
    return UNet2DConditionModel(
        sample_size=high_resolution // config.patch_size,
        in_channels=2 * image_channels,  # noisy high-resolution image + upsampled low-resolution condition
        out_channels=image_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.attention_heads,  # read as the number of heads (diffusers issue #2011)
        # The noise level goes through the sinusoidal timestep projection and an MLP, and is added to the
        # timestep embedding: diffusers' class embedding of type "timestep".
        class_embed_type="timestep",
    )
