"""Variance schedules: β_t for t = 0..T-1 and the cumulative ᾱ_t = Π(1 - β_s), as pure functions.

Names and conventions follow diffusers' schedulers so that a trained model samples with any of them.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["linear", "scaled_linear", "cosine"]

# (β_1, β_T) of the linear schedule of DDPM (Ho et al. 2020, §4) and the scaled-linear one of Stable Diffusion.
LINEAR_BETA_RANGE = (1e-4, 0.02)
SCALED_LINEAR_BETA_RANGE = (0.00085, 0.012)
# Improved DDPM (Nichol & Dhariwal 2021, eq. 17): offset s and the clip on β_t that avoids a singularity at t = T.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999

# Our schedule names -> diffusers' `beta_schedule` names.
DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def beta_range(schedule: Schedule) -> tuple[float, float]:
    """(β_start, β_end) for the linear schedules; the cosine schedule ignores them."""
    return SCALED_LINEAR_BETA_RANGE if schedule == "scaled_linear" else LINEAR_BETA_RANGE


def cosine_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) = cos²(((t + s) / (1 + s)) · π/2) for t in [0, 1] (Improved DDPM, eq. 17, unnormalised)."""
    return torch.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2


def betas(schedule: Schedule, num_timesteps: int) -> torch.Tensor:
    """β_t for t = 0..T-1 in float64."""
    if schedule == "linear":
        start, end = LINEAR_BETA_RANGE
        return torch.linspace(start, end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        start, end = SCALED_LINEAR_BETA_RANGE
        return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = cosine_alpha_bar(steps)
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=COSINE_MAX_BETA)
    raise ValueError(f"unknown schedule {schedule!r}; valid: linear, scaled_linear, cosine")


def alphas_cumprod(schedule: Schedule, num_timesteps: int) -> torch.Tensor:
    """ᾱ_t = Π_{s ≤ t} (1 - β_s), in float64."""
    return torch.cumprod(1 - betas(schedule, num_timesteps), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """β_t rescaled so that SNR(T) = 0 (Lin et al. 2023, "Common diffusion noise schedules are flawed", Alg. 1):
    √ᾱ_t is shifted so its last value is 0 and scaled so its first is unchanged; the model then trains on pure noise."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def scheduler_alphas_cumprod(config: dict) -> torch.Tensor:
    """ᾱ_t of a diffusers scheduler config: t2i's own schedules exactly as above, any other (trained betas, other
    β ranges) as diffusers computes it."""
    ours = {name: schedule for schedule, name in DIFFUSERS_BETA_SCHEDULE.items()}.get(config.get("beta_schedule"))
    if ours is not None and config.get("trained_betas") is None and (
            ours == "cosine" or (config.get("beta_start"), config.get("beta_end")) == beta_range(ours)):
        if config.get("rescale_betas_zero_snr"):
            return torch.cumprod(1 - rescale_zero_terminal_snr(betas(ours, config["num_train_timesteps"])), dim=0)
        return alphas_cumprod(ours, config["num_train_timesteps"])
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config).alphas_cumprod.to(torch.float64)


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ / (1 - ᾱ) of x_t = √ᾱ x_0 + √(1-ᾱ) ε."""
    return alpha_bar / (1 - alpha_bar)


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """λ = log SNR = log ᾱ − log(1 − ᾱ) (Kingma et al. 2021, "Variational diffusion models", eq. 3); λ = −2 log σ."""
    return alpha_bar.log() - torch.log1p(-alpha_bar)


def scheduler_config(schedule: Schedule, num_timesteps: int, prediction: str, zero_terminal_snr: bool = False
                     ) -> dict:
    """The diffusers scheduler config that reproduces this schedule and parameterisation; `zero_terminal_snr`
    rescales it to SNR(T) = 0 (diffusers' `rescale_betas_zero_snr`)."""
    start, end = beta_range(schedule)
    rescale = {"rescale_betas_zero_snr": True} if zero_terminal_snr else {}
    return {**rescale,
        "num_train_timesteps": num_timesteps,
        "beta_schedule": DIFFUSERS_BETA_SCHEDULE[schedule],
        "beta_start": start,
        "beta_end": end,
        "prediction_type": prediction,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading" if schedule == "scaled_linear" else "trailing",
    }


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ = √((1 − ᾱ) / ᾱ) = 1/√SNR: the noise scale of x_t / √ᾱ = x_0 + σ ε (Karras et al. 2022, §2)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1 / (1 + σ²), the inverse of `sigma_from_alpha_bar`."""
    return 1 / (1 + sigma**2)


def karras_sigmas(count: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """`count` noise levels σ_i = (σ_max^(1/ρ) + i/(n−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0 (Karras et al. 2022,
    eq. 5); ρ = 7 spends the steps near σ_min, where detail forms."""
    ramp = torch.linspace(0, 1, count, dtype=torch.float64)
    inverse_min, inverse_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inverse_max + ramp * (inverse_min - inverse_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def geometric_sigmas(count: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """`count` noise levels in geometric progression from σ_max down to σ_min, then 0: the ladder of annealed Langevin
    dynamics (Song & Ermon 2019, §4.2), along which each level is a fixed factor below the one before."""
    levels = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), count, dtype=torch.float64)
    return torch.cat([levels, levels.new_zeros(1)])


def timestep_from_sigma(sigma: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep t whose σ is `sigma`, linear in log σ between the trained σ_t (the inverse
    of diffusers' sigma interpolation in `EulerDiscreteScheduler._sigma_to_t`). `train_sigmas` increases with t."""
    log_sigmas = train_sigmas.to(device=sigma.device, dtype=torch.float64).log()
    log_sigma = sigma.to(torch.float64).clamp(log_sigmas[0].exp(), log_sigmas[-1].exp()).log()
    upper = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    low, high = log_sigmas[upper - 1], log_sigmas[upper]
    return (upper - 1) + (log_sigma - low) / (high - low)
