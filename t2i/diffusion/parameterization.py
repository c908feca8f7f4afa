"""The forward process x_t = √ᾱ x_0 + √(1-ᾱ) ε and the ε / x_0 / v parameterisations that invert it.

v = √ᾱ ε - √(1-ᾱ) x_0 is the velocity of Salimans & Ho (2022, "Progressive distillation", §4).
`alpha_bar` may be a scalar tensor or hold one value per batch item.
"""
from __future__ import annotations

from typing import Literal

import torch

Prediction = Literal["epsilon", "v_prediction", "sample"]  # "sample" is x_0 itself, as diffusers names it


def _per_item(alpha_bar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape (B,) to (B, 1, 1, ...) so it broadcasts over `like`, in `like`'s dtype."""
    alpha_bar = alpha_bar.to(device=like.device, dtype=like.dtype)
    return alpha_bar.reshape(alpha_bar.shape + (1,) * (like.ndim - alpha_bar.ndim))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) (DDPM, eq. 4)."""
    a = _per_item(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ ε - √(1-ᾱ) x_0."""
    a = _per_item(alpha_bar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def x0_from_eps(xt: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = _per_item(alpha_bar, xt)
    return (xt - (1 - a).sqrt() * eps) / a.sqrt()


def x0_from_v(xt: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = _per_item(alpha_bar, xt)
    return a.sqrt() * xt - (1 - a).sqrt() * v


def eps_from_v(xt: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = _per_item(alpha_bar, xt)
    return (1 - a).sqrt() * xt + a.sqrt() * v


def x0_from_prediction(prediction: str, xt: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor,
                       ) -> torch.Tensor:
    """x̂_0 from a network's output under any parameterisation: ε, v, or x_0 itself ("sample")."""
    if prediction == "epsilon":
        return x0_from_eps(xt, output, alpha_bar)
    if prediction == "v_prediction":
        return x0_from_v(xt, output, alpha_bar)
    if prediction == "sample":
        return output
    raise ValueError(f"unknown prediction {prediction!r}; valid: epsilon, v_prediction, sample")


def training_target(prediction: Prediction, x0: torch.Tensor, noise: torch.Tensor,
                    alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network learns to output for x_t: ε itself, v, or x_0 (DDPM, §3.2, the parameterisation it set aside)."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return velocity(x0, noise, alpha_bar)
    if prediction == "sample":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}; valid: epsilon, v_prediction, sample")
