"""Samplers written here, as pure functions that see the model only as a denoiser D(x, σ) ≈ E[x_0 | x].

Conventions follow k-diffusion (Karras et al. 2022, "Elucidating the design space", §2): x = x_0 + σ n, the
coordinates in which DDPM's x_t is x_t / √ᾱ_t with σ = √((1 − ᾱ_t) / ᾱ_t) and the VP SDE becomes the VE SDE; the score
is ∇ log p_σ(x) = (D(x, σ) − x) / σ². A sampler takes x = σ_0 · noise and a decreasing ladder `sigmas`; a ladder that
ends in 0 ends with the denoiser's estimate x̂_0 at the last positive σ (the "noise removal" step of Song et al.
2021's code), one that ends at σ > 0 leaves x at that noise level. `generator` is a torch.Generator, or one per batch
item so that each item's noise depends on its own seed alone. Samplers never modify the caller's tensors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Literal

import torch

from t2i.diffusion.ode import solve_ode

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x (B, ...), σ (B,)) -> x̂_0 (B, ...)
Generator = torch.Generator | Sequence[torch.Generator] | None
StepNorms = Literal["item", "batch"]
SDE = Literal["ve", "vp"]

# Song et al. 2021, Table 5 / configs: signal-to-noise ratio r of the Langevin corrector for VE models at 32².
DEFAULT_CORRECTOR_SNR = 0.16
# Song & Ermon 2019, §5: ε = 2·10⁻⁵ at σ_L = 0.01, i.e. every level's step is α_i = ε σ_i² / σ_L² = 0.2 σ_i².
DEFAULT_LANGEVIN_STEP_RATIO = 0.2
DEFAULT_LANGEVIN_STEPS_PER_LEVEL = 5
# scipy RK45 tolerances used by Song et al. 2021 for sampling and likelihoods.
DEFAULT_ODE_TOLERANCE = 1e-5


def noise_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the CPU from one generator or one per batch item."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return torch.cat([torch.randn((1,) + x.shape[1:], generator=g, dtype=x.dtype) for g in generator]).to(x.device)


def _sigma_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])


def _per_item(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def to_score(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """∇ log p_σ(x) = (D(x, σ) − x) / σ² (Tweedie's formula, Efron 2011)."""
    return (denoised - x) / _per_item(sigma, x) ** 2


def _final_denoise(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x̂_0 at the last positive σ when the ladder ends in 0, else x unchanged."""
    if sigmas[-1] == 0:
        return denoise(x, _sigma_batch(sigmas[-2], x))
    return x


def ddim_noise_split(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_down, σ_up) of a DDIM step σ → σ' (Song et al. 2020, "DDIM", eq. 12 and 16).

    DDIM's fresh-noise scale σ_t(η) = η √((1 − ᾱ')/(1 − ᾱ)) √(1 − ᾱ/ᾱ') becomes σ_up = σ_t(η)/√ᾱ' in x/√ᾱ
    coordinates, and the deterministic part moves to σ_down = √(σ'² − σ_up²). η = 1 is DDPM's ancestral step.
    """
    alpha_bar, alpha_bar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    fresh = eta * ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)).clamp(min=0).sqrt()
    sigma_up = torch.minimum(fresh / alpha_bar_next.sqrt(), sigma_next)
    return (sigma_next**2 - sigma_up**2).sqrt(), sigma_up


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, eta: float = 0.0,
                generator: Generator = None) -> torch.Tensor:
    """DDIM (Song et al. 2020, eq. 12): x' = x̂_0 + σ_down ε̂ + σ_up z with ε̂ = (x − x̂_0)/σ; η = 0 is deterministic."""
    for sigma, sigma_next in pairwise(sigmas):
        denoised = denoise(x, _sigma_batch(sigma, x))
        if sigma_next == 0:
            return denoised
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ddim_noise_split(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * noise_like(x, generator)
    return x


@torch.no_grad()
def invert_ddim(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, fixed_point_iterations: int = 0,
                ) -> torch.Tensor:
    """Deterministic DDIM run backwards (Song et al. 2020, §4.3; Dhariwal & Nichol 2021, App. F): x at sigmas[-1]
    to the latent at sigmas[0] that `sample_ddim(denoise, ·, sigmas)` maps back to x.

    Each step x → x' = x̂_0 + σ' ε̂ evaluates the model at the point it starts from, so the round trip is exact
    only as the steps shrink. `fixed_point_iterations` > 0 re-evaluates it at x' instead, solving the sampling
    step x = D(x', σ') + σ (x' − D(x', σ'))/σ' for x' by fixed-point iteration (Pan et al. 2023, "Effective real
    image editing with accelerated iterative diffusion inversion", §3). `sigmas` is the sampling ladder, all > 0.
    """
    ladder = sigmas.flip(0)
    for sigma, sigma_next in pairwise(ladder):
        denoised = denoise(x, _sigma_batch(sigma, x))
        target = x
        x = denoised + sigma_next * (x - denoised) / sigma
        for _ in range(fixed_point_iterations):
            denoised = denoise(x, _sigma_batch(sigma_next, x))
            x = denoised + sigma_next * (target - denoised) / sigma
    return x


def _corrector_step(score: torch.Tensor, z: torch.Tensor, snr: float, norms: StepNorms) -> torch.Tensor:
    """ε = 2 (r ‖z‖ / ‖s‖)² (Song et al. 2021, Alg. 4), per item (B,) or from batch means as in the paper's code."""
    score_norm, noise_norm = score.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1)
    if norms == "batch":
        score_norm, noise_norm = score_norm.mean().expand_as(score_norm), noise_norm.mean().expand_as(noise_norm)
    return 2 * (snr * noise_norm / score_norm.clamp(min=1e-20)) ** 2


def _vp_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma**2)


def _ve_predictor(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                  z: torch.Tensor) -> torch.Tensor:
    """Reverse diffusion of the VE SDE (Song et al. 2021, eq. 46): x + (σ² − σ'²) s + √(σ² − σ'²) z."""
    variance = sigma**2 - sigma_next**2
    return x + variance * (denoised - x) / sigma**2 + variance.sqrt() * z


def _vp_predictor(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                  z: torch.Tensor) -> torch.Tensor:
    """Reverse diffusion of the VP SDE, discretised as its forward process x_i = √(1 − β_i) x_{i−1} + √β_i z is
    (Song et al. 2021, §4.1 and App. E): x_t' = (2 − √(1 − β)) x_t + β s_t + √β z, with the step's β = 1 − ᾱ/ᾱ' and
    s_t the score of x_t = √ᾱ x. Its noise √β ≤ 1 is bounded at any step size, where the VE form on a DDPM
    model adds noise of the size of σ itself."""
    alpha_bar, alpha_bar_next = _vp_alpha_bar(sigma), _vp_alpha_bar(sigma_next)
    beta = 1 - alpha_bar / alpha_bar_next
    xt = alpha_bar.sqrt() * x
    score_t = alpha_bar.sqrt() * (denoised - x) / (1 - alpha_bar)
    xt_next = (2 - (1 - beta).sqrt()) * xt + beta * score_t + beta.sqrt() * z
    return xt_next / alpha_bar_next.sqrt()


@torch.no_grad()
def sample_pc(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, snr: float = DEFAULT_CORRECTOR_SNR,
              corrector_steps: int = 1, norms: StepNorms = "item", sde: SDE = "ve",
              generator: Generator = None) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, "Score-based generative modeling through SDEs", Alg. 2).

    At each level, Langevin corrector steps x ← x + ε s + √(2ε) z with ε = 2 (r ‖z‖ / ‖s‖)² (Alg. 4; for the VP SDE
    ε is also scaled by the step's α = ᾱ/ᾱ', Alg. 5), then the reverse-diffusion predictor of the SDE the model was
    trained with: `sde="ve"` for score models of the VE SDE (eq. 46), `sde="vp"` for DDPM-trained ones. Langevin
    steps with these ε are the same in x and in x_t = √ᾱ x, so the corrector runs in σ-coordinates for both. Norms
    are taken per item, not over the batch as in the paper's code, so that an image does not depend on its batch.
    """
    predictor = {"ve": _ve_predictor, "vp": _vp_predictor}[sde]
    for sigma, sigma_next in pairwise(sigmas):
        sigma_batch = _sigma_batch(sigma, x)
        step_scale = _vp_alpha_bar(sigma) / _vp_alpha_bar(sigma_next) if sde == "vp" else 1.0
        for _ in range(corrector_steps):
            score = to_score(x, denoise(x, sigma_batch), sigma_batch)
            z = noise_like(x, generator)
            step = step_scale * _per_item(_corrector_step(score, z, snr, norms), x)
            x = x + step * score + (2 * step).sqrt() * z
        denoised = denoise(x, sigma_batch)
        if sigma_next == 0:
            return denoised  # the predictor's mean x + σ² s is x̂_0: the noise-free last step
        x = predictor(x, denoised, sigma, sigma_next, noise_like(x, generator))
    return x


@torch.no_grad()
def sample_annealed_langevin(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                             steps_per_level: int = DEFAULT_LANGEVIN_STEPS_PER_LEVEL,
                             step_ratio: float = DEFAULT_LANGEVIN_STEP_RATIO,
                             generator: Generator = None) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, "Generative modeling by estimating gradients", Alg. 1).

    For each level σ_i of the decreasing ladder, T steps x ← x + (α_i/2) s(x, σ_i) + √α_i z with α_i = ε σ_i²/σ_L²;
    `step_ratio` is ε/σ_L². A ladder ending in 0 ends with x̂_0 at σ_L (Song & Ermon 2020, "Improved techniques", §4).
    """
    levels = sigmas[sigmas > 0]
    for sigma in levels:
        sigma_batch = _sigma_batch(sigma, x)
        alpha = step_ratio * sigma**2
        for _ in range(steps_per_level):
            score = to_score(x, denoise(x, sigma_batch), sigma_batch)
            x = x + alpha / 2 * score + alpha.sqrt() * noise_like(x, generator)
    return _final_denoise(denoise, x, sigmas)


def probability_flow(denoise: Denoiser) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The probability-flow ODE (Song et al. 2021, eq. 13) in λ = log σ: dx/dλ = σ dx/dσ = x − D(x, σ)."""
    def drift(log_sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x - denoise(x, log_sigma.exp().to(x.dtype))
    return drift


@torch.no_grad()
def sample_pf_ode(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, rtol: float = DEFAULT_ODE_TOLERANCE,
                  atol: float = DEFAULT_ODE_TOLERANCE) -> torch.Tensor:
    """Solve the probability-flow ODE from sigmas[0] to the last positive σ with adaptive Dormand–Prince RK45, as
    Song et al. 2021 do with scipy (§4.3); the steps are chosen by the error control, only the ends by `sigmas`."""
    levels = sigmas[sigmas > 0]
    x, _ = solve_ode(probability_flow(denoise), x, math.log(levels[0]), math.log(levels[-1]), rtol, atol)
    return _final_denoise(denoise, x, sigmas)
