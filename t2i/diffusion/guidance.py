"""Guidance: classifier-free guidance (Ho & Salimans 2022, eq. 6), its rescaling (Lin et al. 2023), Imagen's
dynamic thresholding (Saharia et al. 2022) and classifier guidance (Dhariwal & Nichol 2021)."""
from __future__ import annotations

import torch

from t2i.diffusion.parameterization import eps_from_v, x0_from_eps

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


def guide_batched(output: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance of one batched forward's output [unconditional; conditional] (2B, ...) -> (B, ...),
    with guidance rescale by φ = `rescale` when it is not 0."""
    uncond, cond = output.chunk(2)
    guided = classifier_free_guidance(uncond, cond, scale)
    return rescale_guidance(guided, cond, rescale) if rescale else guided


def dynamic_threshold(x0: torch.Tensor, percentile: float = DEFAULT_THRESHOLD_PERCENTILE,
                      max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022, §2.3): s = max(percentile of |x̂_0| per item, max_value);
    clip x̂_0 to [−s, s] and divide by s, so saturated pixels are pushed inwards rather than clipped flat."""
    s = torch.quantile(x0.flatten(1).abs().float(), percentile, dim=1).clamp(min=max_value).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def classifier_guidance(prediction: str, xt: torch.Tensor, output: torch.Tensor, grad_log_prob: torch.Tensor,
                        alpha_bar: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier guidance (Dhariwal & Nichol 2021, "Diffusion models beat GANs", §4.2, Algorithm 2):
    ε̂' = ε̂ − √(1−ᾱ_t) · s · ∇_{x_t} log p_φ(y | x_t).

    `output` is the network's prediction for x_t under `prediction` (ε, v or x_0 = "sample"); it is turned into ε̂,
    shifted, and turned back. In x̂_0 terms the shift is x̂_0' = x̂_0 + s (1−ᾱ_t)/√ᾱ_t ∇ log p: towards the class.
    `alpha_bar` is a scalar or (B,); s = 0 returns `output` unchanged.
    """
    a = alpha_bar.to(device=xt.device, dtype=xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))
    eps = _eps_from_output(prediction, xt, output, a)
    guided = eps - (1 - a).sqrt() * scale * grad_log_prob
    return _output_from_eps(prediction, xt, guided, a)


def _eps_from_output(prediction: str, xt: torch.Tensor, output: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if prediction == "epsilon":
        return output
    if prediction == "v_prediction":
        return eps_from_v(xt, output, a)
    if prediction == "sample":
        return (xt - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction {prediction!r}; valid: epsilon, v_prediction, sample")


def _output_from_eps(prediction: str, xt: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The inverse of `_eps_from_output`: v = (ε − √(1−ᾱ) x_t) / √ᾱ, x_0 = (x_t − √(1−ᾱ) ε) / √ᾱ."""
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return (eps - (1 - a).sqrt() * xt) / a.sqrt()
    if prediction == "sample":
        return x0_from_eps(xt, eps, a)
    raise ValueError(f"unknown prediction {prediction!r}; valid: epsilon, v_prediction, sample")
