"""Learned reverse-process variances and the variational bound that trains them (Nichol & Dhariwal 2021, "Improved
denoising diffusion probabilistic models", §3.1).

The U-Net outputs 2C channels: its usual prediction (ε, v or x_0) and, per latent element, v ∈ [−1, 1] (unclamped,
as in the paper) that interpolates the log-variance of p_θ(x_{t−1} | x_t) between the true posterior's β̃_t and β_t
(eq. 15). That half trains on the bound's term L_t at a uniform t; the prediction half keeps the simple loss (eq. 16).
diffusers' DDPMScheduler samples with it under `variance_type="learned_range"`.

`alpha_bar` arguments are the whole table ᾱ_0..ᾱ_{T−1} (any dtype; float64 keeps β_t exact near t = 0) and `t` holds
one training timestep per batch item; ᾱ_{−1} = 1.
"""
from __future__ import annotations

import math

import torch

from t2i.diffusion.losses import diffusion_loss
from t2i.diffusion.parameterization import Prediction, _per_item, x0_from_prediction

# diffusers' `variance_type` for the interpolated variance of eq. 15; the pipeline's scheduler config records it.
LEARNED_RANGE = "learned_range"


def predicts_variance(scheduler_config: dict) -> bool:
    """Does the U-Net of this scheduler config output a learned variance beside its prediction?"""
    return scheduler_config.get("variance_type") == LEARNED_RANGE


def split_variance(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, v): the two halves of a learned-variance U-Net's output (B, 2C, h, w) on channels."""
    prediction, variance = output.chunk(2, dim=1)
    return prediction, variance


def _previous(alpha_bar: torch.Tensor) -> torch.Tensor:
    """ᾱ_{t−1} for every t, with ᾱ_{−1} = 1."""
    return torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])


def posterior_variance(alpha_bar: torch.Tensor) -> torch.Tensor:
    """β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t, with β_t = 1 − ᾱ_t / ᾱ_{t−1} (DDPM, eq. 7), for every t."""
    previous = _previous(alpha_bar)
    beta = 1 - alpha_bar / previous
    return (1 - previous) / (1 - alpha_bar) * beta


def log_variance_bounds(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log β̃_t, log β_t) for every t: the ends of the learned range. β̃_0 = 0, so log β̃_0 is log β̃_1, as the
    paper's code clips it."""
    beta = 1 - alpha_bar / _previous(alpha_bar)
    tilde = posterior_variance(alpha_bar)
    tilde = torch.cat([tilde[1:2], tilde[1:]])
    return tilde.log(), beta.log()


def posterior_mean(x0: torch.Tensor, xt: torch.Tensor, alpha_bar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """μ̃_t(x_t, x_0) = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t (DDPM, eq. 7)."""
    now, previous = alpha_bar[t], _previous(alpha_bar)[t]
    beta = 1 - now / previous
    x0_coefficient = _per_item(previous.sqrt() * beta / (1 - now), x0)
    xt_coefficient = _per_item((1 - beta).sqrt() * (1 - previous) / (1 - now), xt)
    return x0_coefficient * x0 + xt_coefficient * xt


def learned_log_variance(v: torch.Tensor, alpha_bar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log Σ_θ = v' log β_t + (1 − v') log β̃_t with v' = (v + 1) / 2 (Improved DDPM, eq. 15, as its code and
    diffusers' `learned_range` read the network's v ∈ [−1, 1])."""
    log_tilde, log_beta = log_variance_bounds(alpha_bar)
    fraction = (v + 1) / 2
    return fraction * _per_item(log_beta[t], v) + (1 - fraction) * _per_item(log_tilde[t], v)


def normal_kl(mean_1: torch.Tensor, log_var_1: torch.Tensor, mean_2: torch.Tensor,
              log_var_2: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_1, e^{log σ²_1}) ‖ N(μ_2, e^{log σ²_2})) per element, in nats."""
    return 0.5 * (log_var_2 - log_var_1 - 1 + (log_var_1 - log_var_2).exp()
                  + (mean_1 - mean_2).pow(2) * (-log_var_2).exp())


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """−log N(x; μ, e^{log σ²}) per element, in nats: the decoder term L_0 for continuous latents (the paper's
    discretised decoder, eq. 13 of DDPM, assumes 8-bit pixels; a density can go below 0)."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean).pow(2) * (-log_var).exp())


def vlb_terms(prediction: Prediction, model_output: torch.Tensor, v: torch.Tensor, x0: torch.Tensor,
              xt: torch.Tensor, alpha_bar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L_t per batch item in bits per dimension (DDPM, eq. 5): KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for
    t > 0 and −log p_θ(x_0 | x_1) for t = 0, with p_θ's mean from the network's ε, v or x_0 prediction through
    x̂_0 (DDPM, eq. 11) and its variance from `v` (eq. 15)."""
    x0_hat = x0_from_prediction(prediction, xt, model_output, alpha_bar[t])
    model_mean = posterior_mean(x0_hat, xt, alpha_bar, t)
    model_log_var = learned_log_variance(v, alpha_bar, t)
    true_log_var = _per_item(log_variance_bounds(alpha_bar)[0][t], xt)
    kl = normal_kl(posterior_mean(x0, xt, alpha_bar, t), true_log_var, model_mean, model_log_var)
    decoder = gaussian_nll(x0, model_mean, model_log_var)
    first = (t == 0).reshape(-1, *([1] * (xt.ndim - 1)))
    per_element = torch.where(first, decoder, kl)
    return per_element.flatten(1).mean(dim=1) / math.log(2)


def hybrid_loss(prediction: Prediction, output: torch.Tensor, target: torch.Tensor, x0: torch.Tensor,
                xt: torch.Tensor, alpha_bar: torch.Tensor, t: torch.Tensor, vlb_weight: float,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_hybrid, L_vlb) = L_simple + λ L_vlb (Improved DDPM, eq. 16), for the 2C-channel `output`.

    L_simple is the (optionally Min-SNR-weighted) squared error of the prediction half. L_vlb = Σ_t L_t is estimated
    as T · L_t at the uniform t, as the paper's code does (its `num_timesteps / 1000` with λ = 1/1000). The mean
    is detached inside L_vlb (the stop-gradient of §3.1): the bound trains the variance half only.
    """
    model_output, v = split_variance(output.float())
    simple = diffusion_loss(model_output, target, weights)
    vlb = vlb_terms(prediction, model_output.detach(), v, x0.float(), xt.float(), alpha_bar, t).mean()
    return simple + vlb_weight * len(alpha_bar) * vlb, vlb.detach()
