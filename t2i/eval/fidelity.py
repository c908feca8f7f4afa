"""Full-reference image fidelity: PSNR and SSIM of images against the truth, per image.

Images are (B, C, H, W) tensors in [0, 1]. SSIM is Wang et al. 2004 ("Image quality assessment: from error
visibility to structural similarity", eq. 13) with their 11x11 Gaussian window (σ = 1.5) and constants, over
the valid region, averaged over channels; written here because neither torch nor the venv carries it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(1 / MSE), per image: (B,)."""
    mse = (images.double() - truth.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def _gaussian_window(channels: int) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    profile = torch.exp(-offsets ** 2 / (2 * SSIM_SIGMA ** 2))
    profile = profile / profile.sum()
    return (profile[:, None] * profile[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)


def ssim(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity per image: (B,), 1 for identical images."""
    x, y = images.double(), truth.double()
    window = _gaussian_window(x.shape[1])

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    covariance = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)
