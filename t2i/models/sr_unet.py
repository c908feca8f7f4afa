"""The super-resolution denoiser: a stock diffusers UNet2DConditionModel whose input is the noisy high-resolution
image and the upsampled low-resolution one side by side on channels (after space-to-depth, when patch_size > 1),
with cross-attention on the text and a timestep-style class embedding of the conditioning noise level."""
from __future__ import annotations

from diffusers import UNet2DConditionModel

from t2i.config import SRConfig
from t2i.models.unet import conditional_unet

RGB = 3


def build_sr_unet(config: SRConfig, cross_attention_dim: int, high_resolution: int) -> UNet2DConditionModel:
    image_channels = RGB * config.patch_size ** 2
    # in: the noisy high-resolution image + the upsampled low-resolution condition. The noise level goes through
    # the sinusoidal timestep projection and an MLP and is added to the timestep embedding: diffusers' class
    # embedding of type "timestep".
    return conditional_unet(config, high_resolution // config.patch_size, 2 * image_channels, image_channels,
                            cross_attention_dim, class_embed_type="timestep")
