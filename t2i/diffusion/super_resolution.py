"""The pieces of a super-resolution diffusion stage, as pure functions over (B, C, H, W) image tensors.

Cascaded diffusion (Ho et al. 2021, "Cascaded Diffusion Models for High Fidelity Image Generation") conditions
each super-resolution model on the previous stage's image, upsampled, with Gaussian noise added to it
("conditioning augmentation", §3.2) so that it learns to ignore the artefacts the previous stage leaves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i.diffusion.parameterization import add_noise


def area_downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Each factor x factor block replaced by its mean: (B, C, H, W) -> (B, C, H/f, W/f)."""
    return F.avg_pool2d(images, factor)


def upsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic upsampling, clamped to the [-1, 1] image range: (B, C, h, w) -> (B, C, f·h, f·w)."""
    return F.interpolate(images, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def augmentation_alpha_bar(levels: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ after `levels` forward steps of the schedule: 1 at level 0 (no noise), ᾱ_{l-1} at level l ≥ 1."""
    with_clean = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod])
    return with_clean[levels.to(alphas_cumprod.device)]


def augment_condition(low: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
                      alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Gaussian conditioning augmentation (CDM, §3.2): the low-resolution image taken `levels` steps along
    q(x_t | x_0) (DDPM, eq. 4), one level per batch item; level 0 returns `low` exactly."""
    alpha_bar = augmentation_alpha_bar(levels, alphas_cumprod).to(low.device)
    return torch.where(levels.to(low.device).reshape(-1, 1, 1, 1) == 0, low, add_noise(low, noise, alpha_bar))


def residual_scale(high: torch.Tensor, factor: int) -> float:
    """1 / the standard deviation of what bicubic upsampling misses, high - up(down(high)), over `high`
    (B, C, H, W): the factor that gives the residual unit variance, as a VAE's scaling factor does its latents."""
    return 1.0 / (high - upsample(area_downsample(high, factor), factor)).float().std().clamp_min(1e-6).item()
