"""Guidance: classifier-free guidance (Ho & Salimans 2022, eq. 6), its rescaling (Lin et al. 2023) and Imagen's
dynamic thresholding (Saharia et al. 2022)."""
from __future__ import annotations

import torch

# Imagen (Saharia et al. 2022, §2.3): the percentile of |x̂_0| that sets the threshold s.
DEFAULT_THRESHOLD_PERCENTILE = 0.995


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε(∅) + w (ε(c) - ε(∅)); w = 1 gives the conditional prediction, w = 0 the unconditional one."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common diffusion noise schedules are flawed", eq. 15–16): scale the guided
    prediction to the conditional one's per-item standard deviation, then blend by φ = `factor` (0 leaves it)."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * guided


def dynamic_threshold(x0: torch.Tensor, percentile: float = DEFAULT_THRESHOLD_PERCENTILE,
                      max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022, §2.3): s = max(percentile of |x̂_0| per item, max_value);
    clip x̂_0 to [−s, s] and divide by s, so saturated pixels are pushed inwards rather than clipped flat."""
    s = torch.quantile(x0.flatten(1).abs().float(), percentile, dim=1).clamp(min=max_value).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s
