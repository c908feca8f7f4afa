"""Training losses: the simple diffusion loss of DDPM with optional Min-SNR weighting."""
from __future__ import annotations

import torch

from t2i.diffusion.parameterization import Prediction
from t2i.diffusion.schedules import snr


def min_snr_weights(alpha_bar: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Per-item loss weights of Min-SNR-γ (Hang et al. 2023, eq. 9), expressed for an ε or v target.

    The x_0-space weight min(SNR, γ) becomes min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v.
    """
    ratio = snr(alpha_bar)
    clipped = ratio.clamp(max=gamma)
    if prediction == "sample":
        return clipped
    return clipped / ratio if prediction == "epsilon" else clipped / (ratio + 1)


def diffusion_loss(model_output: torch.Tensor, target: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per item, optionally weighted, averaged over the batch (DDPM, eq. 14)."""
    per_item = (model_output.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_item = per_item * weights.to(per_item)
    return per_item.mean()
