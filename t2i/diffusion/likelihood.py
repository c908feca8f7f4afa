"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, §4.3 and App. D.2).

Along the ODE dx/dλ = f(x, λ) (λ = log σ, f = x − D(x, σ)), the log-density obeys the instantaneous
change of variables d log p_λ(x(λ)) / dλ = −∇·f (Chen et al. 2018, "Neural ODEs", eq. 4), so
log p_σmin(x) = log p_σmax(x(λ_max)) + ∫ ∇·f dλ, integrated from the data up to σ_max. The divergence is exact
(one backward pass per dimension; for toys) or Hutchinson's unbiased estimate vᵀ (∂f/∂x) v with one Rademacher v
per item, fixed along the path (Grathwohl et al. 2019, "FFJORD", §3.1).

Images are discrete, 8-bit levels k shown to the models as k / 127.5 − 1 (t2i.data.transforms.to_tensor). A density
over those values bounds their probabilities in one of two ways: uniform dequantisation (a pixel-space model's
density averaged over each level's bin, as Song et al. 2021 do after Theis et al. 2016, "A note on the evaluation
of generative models") or a discretised decoder that puts a mass on each level (Ho et al. 2020, eq. 13).
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from t2i.diffusion.ode import solve_ode
from t2i.diffusion.score_samplers import (
    DEFAULT_ODE_TOLERANCE,
    Denoiser,
    Generator,
    probability_flow,
)

TraceEstimator = Literal["hutchinson", "exact"]

PIXEL_LEVELS = 256
# The width of one 8-bit level in the models' pixel values k / 127.5 − 1, which span [−1, 1].
PIXEL_BIN_WIDTH = 2 / (PIXEL_LEVELS - 1)


def prior_log_prob(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; 0, (1 + σ²) I) per item: the VP prior N(0, I) of x_T seen in x/√ᾱ coordinates, where ᾱ = 1/(1 + σ²)."""
    variance = 1 + sigma**2
    dims = x[0].numel()
    return -0.5 * (x.flatten(1).pow(2).sum(1) / variance + dims * math.log(2 * math.pi * variance))


def rademacher_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """±1 with equal probability, shaped like x, from one generator or one per item."""
    if generator is None or isinstance(generator, torch.Generator):
        bits = torch.randint(0, 2, x.shape, generator=generator)
    else:
        bits = torch.cat([torch.randint(0, 2, (1,) + x.shape[1:], generator=g) for g in generator])
    return (2 * bits - 1).to(device=x.device, dtype=x.dtype)


def uniform_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """U[0, 1) shaped like x, from one generator or one per item."""
    if generator is None or isinstance(generator, torch.Generator):
        draws = torch.rand(x.shape, generator=generator, dtype=x.dtype)
    else:
        draws = torch.cat([torch.rand((1,) + x.shape[1:], generator=g, dtype=x.dtype) for g in generator])
    return draws.to(x.device)


def pixel_values(levels: torch.Tensor) -> torch.Tensor:
    """8-bit levels k (any integer dtype) -> the models' pixel values k / 127.5 − 1, in float64."""
    return levels.to(torch.float64) * PIXEL_BIN_WIDTH - 1


def dequantize(levels: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Uniform dequantisation: v = (k + u − ½) / 127.5 − 1, u ~ U[0, 1), a point drawn from level k's bin.

    The bins are centred on the values the models were trained on (Song et al. 2021's code uses (k + u) / 256,
    whose bins are offset from k / 255 by up to half a level). Then −log₂ P(k) ≤ E_u[−log₂ p(v)] + D · log₂ 127.5:
    see `dequantization_bits_per_dim`.
    """
    values = pixel_values(levels)
    return values + (uniform_like(values, generator) - 0.5) * PIXEL_BIN_WIDTH


def dequantization_bits_per_dim() -> float:
    """−log₂ of a bin's width: P(k) = ∫_bin p(v) dv ≥ width^D · exp E_u[log p(v)] (Jensen), so a density in
    bits/dim becomes a bound on the levels' bits/dim by adding log₂ 127.5 ≈ 6.99 (Song et al. 2021's "+7" offset
    for their bins of width 2/256)."""
    return -math.log2(PIXEL_BIN_WIDTH)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(std²)) per item (B,): e.g. a VAE encoder's log q(z | x)."""
    standardized = (x - mean) / std
    return (-0.5 * standardized**2 - std.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def _log_normal_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Φ(upper) − Φ(lower)) for lower < upper, accurate in both tails: an interval above 0 is mirrored below."""
    mirror = lower > 0
    low, high = torch.where(mirror, -upper, lower), torch.where(mirror, -lower, upper)
    log_high, log_low = torch.special.log_ndtr(high), torch.special.log_ndtr(low)
    return log_high + torch.log(-torch.expm1(log_low - log_high))


def discretized_gaussian_log_likelihood(levels: torch.Tensor, mean: torch.Tensor,
                                        scale: float | torch.Tensor) -> torch.Tensor:
    """log P(levels | mean) per item (B,) in nats: each level's mass under N(mean, scale²) over its bin in pixel
    values, the lowest bin reaching down to −∞ and the highest up to +∞ (Ho et al. 2020, eq. 13), so the masses of
    the 256 levels sum to 1 and the result is a log-probability of the 8-bit image, not a density."""
    values, mean = pixel_values(levels), mean.to(torch.float64)
    upper = torch.where(levels >= PIXEL_LEVELS - 1, math.inf, (values + PIXEL_BIN_WIDTH / 2 - mean) / scale)
    lower = torch.where(levels <= 0, -math.inf, (values - PIXEL_BIN_WIDTH / 2 - mean) / scale)
    return _log_normal_mass(lower, upper).flatten(1).sum(1)


def _divergence(drift: torch.Tensor, x: torch.Tensor, trace: TraceEstimator, probe: torch.Tensor | None) -> torch.Tensor:
    """∇·f per item (B,) of `drift` = f(x), which must have been computed from x with gradients on."""
    if trace == "hutchinson":
        (vjp,) = torch.autograd.grad(drift, x, probe)
        return (vjp * probe).flatten(1).sum(1)
    if trace == "exact":
        flat = drift.flatten(1)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat.shape[1]):
            (row,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            total = total + row.flatten(1)[:, i]
        return total
    raise ValueError(f"unknown trace estimator {trace!r}; valid: hutchinson, exact")


def ode_log_likelihood(denoise: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float,
                       trace: TraceEstimator = "hutchinson", generator: Generator = None,
                       rtol: float = DEFAULT_ODE_TOLERANCE, atol: float = DEFAULT_ODE_TOLERANCE,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_σmin(x) in nats per item (B,), and the drift evaluations each item needed (B,).

    `denoise` must be differentiable in x. The prior at σ_max is `prior_log_prob`, exact for data of zero mean and
    unit variance and close for any data when σ_max is large.
    """
    flow = probability_flow(denoise)
    probe = rademacher_like(x, generator) if trace == "hutchinson" else None
    shape = x.shape

    def augmented(log_sigma: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # state = [x flattened, ∫∇·f dλ so far]: one ODE for the path and the log-density change.
        with torch.enable_grad():
            point = state[:, :-1].reshape(shape).detach().requires_grad_(True)
            drift = flow(log_sigma, point)
            divergence = _divergence(drift, point, trace, probe)
        return torch.cat([drift.detach().flatten(1), divergence.detach()[:, None]], dim=1)

    start = torch.cat([x.flatten(1), torch.zeros(shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    end, evaluations = solve_ode(augmented, start, math.log(sigma_min), math.log(sigma_max), rtol, atol)
    latent, integral = end[:, :-1].reshape(shape), end[:, -1]
    return prior_log_prob(latent, sigma_max) + integral, evaluations


def bits_per_dim(log_likelihood: torch.Tensor, dims: int) -> torch.Tensor:
    """−log₂ p / D: nats per item to bits per dimension."""
    return -log_likelihood / (dims * math.log(2))


def dequantized_bits_per_dim(denoise: Denoiser, levels: torch.Tensor, sigma_min: float, sigma_max: float,
                             trace: TraceEstimator = "hutchinson", generator: Generator = None,
                             rtol: float = DEFAULT_ODE_TOLERANCE, atol: float = DEFAULT_ODE_TOLERANCE,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """An upper bound on −log₂ P(levels) / D per item (B,) for a model that denoises pixels directly (Song et al.
    2021, §4.3 and App. D.2): the ODE likelihood of the dequantised image plus `dequantization_bits_per_dim`; and
    the drift evaluations each item needed. Each item's generator draws its dequantisation noise, then its probe."""
    log_likelihood, evaluations = ode_log_likelihood(denoise, dequantize(levels, generator), sigma_min, sigma_max,
                                                     trace, generator, rtol, atol)
    return bits_per_dim(log_likelihood, levels[0].numel()) + dequantization_bits_per_dim(), evaluations
