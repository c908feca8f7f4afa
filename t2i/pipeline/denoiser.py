"""A pipeline's U-Net seen as a denoiser D(x, σ) ≈ E[x_0 | x], with classifier-free guidance, for the samplers
written in t2i (k-diffusion's `DiscreteVDDPMDenoiser` / `DiscreteEpsDDPMDenoiser`, Crowson 2022, in one function).

x = x_t / √ᾱ_t is the latent in σ-coordinates (t2i.diffusion.score_samplers); the U-Net sees x_t = x / √(1 + σ²)
at the fractional training timestep whose σ_t is σ.
"""
from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler

from t2i.diffusion.guidance import dynamic_threshold, guide_batched
from t2i.diffusion.parameterization import x0_from_prediction
from t2i.diffusion.schedules import (
    ZERO_SNR_ALPHA_BAR,
    alpha_bar_from_sigma,
    scheduler_alphas_cumprod,
    sigma_from_alpha_bar,
    timestep_from_sigma,
)
from t2i.diffusion.score_samplers import Denoiser
from t2i.diffusion.vlb import predicts_variance, split_variance
from t2i.pipeline.classifier_guidance import Guide


def sampling_sigmas(scheduler_config: dict, steps: int) -> torch.Tensor:
    """The decreasing σ ladder of `steps` steps, then 0, spaced as the config says (as the `euler` sampler's)."""
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.to(torch.float64)


def unet_denoiser(unet, context: torch.Tensor, guidance: float, scheduler_config: dict, guidance_rescale: float = 0.0,
                  threshold_percentile: float | None = None, guide: Guide | None = None) -> Denoiser:
    """D(x, σ) of `unet` for token states `context` (B, L, D), or (2B, L, D) as [negative; positive] when guidance ≠ 1;
    guidance rescale acts on the guided network output, dynamic thresholding on x̂_0 (as in diffusers); `guide`
    (t2i.pipeline.classifier_guidance) shifts the guided output by a classifier's gradient."""
    # ᾱ_T = 0 under zero-terminal SNR: clamped as diffusers' Euler schedulers clamp it, so that σ_T stays finite.
    train_sigmas = sigma_from_alpha_bar(scheduler_alphas_cumprod(scheduler_config).clamp(min=ZERO_SNR_ALPHA_BAR))
    prediction = scheduler_config.get("prediction_type", "epsilon")
    use_guidance = guidance != 1.0
    learned_variance = predicts_variance(scheduler_config)  # D(x, σ) is a mean: the variance half is not needed

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha_bar = alpha_bar_from_sigma(sigma.to(torch.float64)).to(x.dtype)
        xt = x * alpha_bar.sqrt().reshape(-1, *([1] * (x.ndim - 1)))
        timestep = timestep_from_sigma(sigma, train_sigmas).to(torch.float32).to(x.device)
        model_input, model_timestep = ((torch.cat([xt] * 2), torch.cat([timestep] * 2)) if use_guidance
                                       else (xt, timestep))
        output = unet(model_input.to(unet.dtype), model_timestep, encoder_hidden_states=context).sample.to(x.dtype)
        if learned_variance:
            output = split_variance(output)[0]
        if use_guidance:
            output = guide_batched(output, guidance, guidance_rescale)
        if guide is not None:
            output = guide(xt, timestep, output, alpha_bar)
        x0 = x0_from_prediction(prediction, xt, output, alpha_bar)
        return x0 if threshold_percentile is None else dynamic_threshold(x0, threshold_percentile)

    return denoise
