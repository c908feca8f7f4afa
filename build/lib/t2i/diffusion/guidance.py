"""Classifier-free guidance (Ho & Salimans 2022, eq. 6)."""
from __future__ import annotations

import torch


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε(∅) + w (ε(c) - ε(∅)); w = 1 gives the conditional prediction, w = 0 the unconditional one."""
    return uncond + scale * (cond - uncond)
