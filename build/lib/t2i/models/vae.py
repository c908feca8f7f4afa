"""The VAE: a diffusers AutoencoderKL built from a VAEConfig, and the latent scaling factor measured on data."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from t2i.config import VAEConfig


def build_vae(config: VAEConfig, resolution: int) -> AutoencoderKL:
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=resolution,
    )


def latent_factor(vae: AutoencoderKL) -> int:
    """How many pixels one latent cell spans along each side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of posterior samples, so that scaled latents have unit variance (Rombach et al. 2022, §4.3.2)."""
    generator = torch.Generator().manual_seed(0)
    latents = []
    for batch in images.split(batch_size):
        posterior = vae.encode(batch.to(vae.device, vae.dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        latents.append((posterior.mean + posterior.std * noise).float().cpu())
    return float(1.0 / torch.cat(latents).std())
