"""The samplers and the ODE likelihood written in t2i, on a 2-D Gaussian mixture whose score and density are known
in closed form at every noise level (no network): each must reproduce the distribution it is meant to."""
import inspect
import math

import pytest
import torch
from diffusers import HeunDiscreteScheduler

from t2i.diffusion import score_samplers as samplers
from t2i.diffusion.likelihood import bits_per_dim, ode_log_likelihood, prior_log_prob
from t2i.diffusion.ode import solve_ode
from t2i.diffusion.parameterization import velocity
from t2i.diffusion.samplers import SAMPLERS as SCHEDULER_SAMPLERS
from t2i.diffusion.samplers import make_scheduler
from t2i.diffusion.schedules import (
    alpha_bar_from_sigma,
    geometric_sigmas,
    karras_sigmas,
    scheduler_config,
    sigma_from_alpha_bar,
)
from t2i.diffusion.toy import three_mode_mixture

MIXTURE = three_mode_mixture()
COUNT = 4000
SIGMA_MIN, SIGMA_MAX = 0.01, 80.0
MOMENT_TOLERANCE, WEIGHT_TOLERANCE = 0.05, 0.03


def geometric_ladder(count: int, sigma_max: float, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    return geometric_sigmas(count, sigma_min, sigma_max)


def assert_reproduces_mixture(samples: torch.Tensor) -> None:
    """Mean within 5% of the spread, covariance within 5% (Frobenius), each mode's weight within 0.03."""
    mean, covariance = MIXTURE.mean(), MIXTURE.covariance()
    spread = covariance.trace().sqrt()
    assert (samples.mean(0) - mean).norm() <= MOMENT_TOLERANCE * spread
    assert (torch.cov(samples.T) - covariance).norm() <= MOMENT_TOLERANCE * covariance.norm()
    modes = MIXTURE.responsibilities(samples).argmax(1)
    weights = torch.bincount(modes, minlength=len(MIXTURE.weights)).double() / len(samples)
    assert (weights - MIXTURE.weights).abs().max() <= WEIGHT_TOLERANCE


def test_mixture_score_is_the_gradient_of_its_log_density_and_the_denoiser_is_tweedie():
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    for sigma in (0.0, 0.3, 5.0):
        point = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(MIXTURE.log_prob(point, sigma).sum(), point)
        assert torch.allclose(MIXTURE.score(x, sigma), gradient, atol=1e-10)
    noise = torch.randn(200_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    samples = MIXTURE.sample(200_000, torch.Generator().manual_seed(2))
    assert torch.allclose(samples.mean(0), MIXTURE.mean(), atol=0.02)
    # E[x_0 | x] is the minimum-MSE estimate: it beats the same estimate perturbed.
    noisy = samples + 0.8 * noise
    denoised = MIXTURE.denoise(noisy, 0.8)
    assert (denoised - samples).pow(2).mean() < (1.05 * denoised - samples).pow(2).mean()
    assert (denoised - samples).pow(2).mean() < (denoised + 0.05 - samples).pow(2).mean()


def test_sigma_helpers_invert_each_other_and_karras_ladder_ends():
    alpha_bar = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    assert torch.allclose(alpha_bar_from_sigma(sigma_from_alpha_bar(alpha_bar)), alpha_bar)
    assert sigma_from_alpha_bar(torch.tensor(0.5)).item() == pytest.approx(1.0)
    ladder = karras_sigmas(10, 0.1, 10.0)
    assert ladder[0].item() == pytest.approx(10.0) and ladder[-2].item() == pytest.approx(0.1) and ladder[-1] == 0
    assert (ladder[:-1].diff() < 0).all()


SAMPLERS = {
    "ddim_eta0": (lambda x, gen: samplers.sample_ddim(MIXTURE.denoise, x, karras_sigmas(100, SIGMA_MIN, SIGMA_MAX))),
    "ddim_eta1": (lambda x, gen: samplers.sample_ddim(MIXTURE.denoise, x, karras_sigmas(150, SIGMA_MIN, SIGMA_MAX),
                                                      eta=1.0, generator=gen)),
    # Batch-mean norms, as in Song et al.'s code: per-item norms of 2-D vectors are too noisy to set a step by.
    "pc": (lambda x, gen: samplers.sample_pc(MIXTURE.denoise, x, karras_sigmas(100, SIGMA_MIN, SIGMA_MAX),
                                             norms="batch", generator=gen)),
    "pc_vp": (lambda x, gen: samplers.sample_pc(MIXTURE.denoise, x, karras_sigmas(100, SIGMA_MIN, SIGMA_MAX),
                                                norms="batch", sde="vp", generator=gen)),
    "annealed_langevin": (lambda x, gen: samplers.sample_annealed_langevin(
        MIXTURE.denoise, x, geometric_ladder(50, 10.0), steps_per_level=20, step_ratio=0.5, generator=gen)),
    "pf_ode": (lambda x, gen: samplers.sample_pf_ode(MIXTURE.denoise, x, karras_sigmas(2, SIGMA_MIN, SIGMA_MAX),
                                                     rtol=1e-4, atol=1e-4)),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_reproduces_the_mixture(name):
    generator = torch.Generator().manual_seed(0)
    sigma_start = 10.0 if name == "annealed_langevin" else SIGMA_MAX
    noise = torch.randn(COUNT, 2, dtype=torch.float64, generator=generator)
    start = sigma_start * noise
    samples = SAMPLERS[name](start, generator)
    assert torch.equal(start, sigma_start * noise)  # the caller's tensor is left alone
    assert_reproduces_mixture(samples)


def test_a_too_short_langevin_chain_does_not_reproduce_the_mixture():
    """The check above can fail: annealed Langevin with one step per level has not mixed."""
    start = 10.0 * torch.randn(COUNT, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    samples = samplers.sample_annealed_langevin(MIXTURE.denoise, start, geometric_ladder(10, 10.0), steps_per_level=1,
                                                generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        assert_reproduces_mixture(samples)


def test_pc_with_per_item_norms_draws_each_item_from_its_own_generator():
    ladder = karras_sigmas(8, SIGMA_MIN, SIGMA_MAX)
    seeds = [3, 4, 5]
    start = SIGMA_MAX * torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    together = samplers.sample_pc(MIXTURE.denoise, start, ladder,
                                  generator=[torch.Generator().manual_seed(s) for s in seeds])
    alone = samplers.sample_pc(MIXTURE.denoise, start[1:2], ladder, generator=[torch.Generator().manual_seed(4)])
    assert torch.allclose(together[1:2], alone, atol=1e-12)


def test_vp_predictor_lands_at_the_next_noise_level_after_a_huge_step():
    """A cosine schedule's 40-step ladder drops from σ = 2·10⁴ to 25.7 in its first step. The VE SDE's reverse
    diffusion adds noise of the size of σ itself there and leaves x far above σ' (what broke `pc` on DDPM models);
    the VP form, which a DDPM model was trained with, leaves it within a small factor of σ'."""
    sigma, sigma_next = torch.tensor(2.03e4, dtype=torch.float64), torch.tensor(25.7, dtype=torch.float64)
    ladder = torch.stack([sigma, sigma_next, sigma_next.new_zeros(())])
    start = sigma * torch.randn(COUNT, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spread = {}
    for sde in ("ve", "vp"):
        after_one_step = samplers.sample_pc(MIXTURE.denoise, start, ladder[:2], corrector_steps=0, sde=sde,
                                            generator=torch.Generator().manual_seed(1))
        spread[sde] = after_one_step.std().item()
    assert spread["ve"] > 100 * sigma_next.item()
    assert sigma_next.item() < spread["vp"] < 2 * sigma_next.item()


def test_pc_vp_corrector_step_is_scaled_by_the_step_alpha():
    """Alg. 5 of Song et al. 2021: the VP corrector's ε is α = ᾱ/ᾱ' times Alg. 4's 2 (r ‖z‖ / ‖s‖)²."""
    x = torch.randn(1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ladder = torch.tensor([3.0, 1.0], dtype=torch.float64)
    score = -x / ladder[0] ** 2  # the score of D ≡ 0
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alpha = alpha_bar_from_sigma(ladder[0]) / alpha_bar_from_sigma(ladder[1])
    for sde, scale in (("ve", 1.0), ("vp", alpha)):
        seen = []

        def zero_denoiser(y, sigma, seen=seen):
            seen.append(y.clone())
            return torch.zeros_like(y)

        samplers.sample_pc(zero_denoiser, x, ladder, sde=sde, generator=torch.Generator().manual_seed(2))
        step = scale * 2 * (samplers.DEFAULT_CORRECTOR_SNR * z.norm() / score.norm()) ** 2
        assert torch.allclose(seen[1], x + step * score + (2 * step).sqrt() * z, atol=1e-12), sde


def test_ddim_eta_splits_the_step_between_the_mean_and_fresh_noise():
    sigma, sigma_next = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    down, up = samplers.ddim_noise_split(sigma, sigma_next, 0.0)
    assert down.item() == pytest.approx(1.0) and up.item() == 0.0
    down, up = samplers.ddim_noise_split(sigma, sigma_next, 1.0)
    # η = 1 is DDPM's posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7): variance β̃ = (1−ᾱ')/(1−ᾱ) β_t.
    alpha_bar, alpha_bar_next = alpha_bar_from_sigma(sigma), alpha_bar_from_sigma(sigma_next)
    beta_tilde = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
    assert (up**2 * alpha_bar_next).item() == pytest.approx(beta_tilde.item())
    assert (down**2 + up**2).item() == pytest.approx(1.0)


def test_ddim_inversion_round_trips():
    """Encode with the ladder reversed, decode with DDIM η = 0: the input comes back."""
    data = MIXTURE.sample(1000, torch.Generator().manual_seed(2))
    x = data + SIGMA_MIN * torch.randn(data.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    errors = {}
    for steps in (50, 100):
        ladder = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX)[:-1]
        latent = samplers.invert_ddim(MIXTURE.denoise, x, ladder)
        errors[steps] = (samplers.sample_ddim(MIXTURE.denoise, latent, ladder) - x).pow(2).mean().sqrt()
    assert errors[100] < 0.6 * errors[50]  # first order: the plain inversion's error halves with the step
    ladder = karras_sigmas(100, SIGMA_MIN, SIGMA_MAX)[:-1]
    latent = samplers.invert_ddim(MIXTURE.denoise, x, ladder, fixed_point_iterations=6)
    assert latent.std() > 0.5 * SIGMA_MAX  # it reached the noise
    error = (samplers.sample_ddim(MIXTURE.denoise, latent, ladder) - x).norm(dim=1)
    assert error.quantile(0.98) < 1e-4 and error.max() < 0.1  # the rare misses sit on the ridges between modes


def test_ode_solver_integrates_a_known_equation_per_item():
    """dy/dt = −k y has y(1) = y(0) e^(−k); items with different k take their own steps."""
    rates = torch.tensor([0.5, 5.0], dtype=torch.float64)
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    y1, evaluations = solve_ode(lambda t, y: -rates[:, None] * y, y0, 0.0, 1.0, rtol=1e-8, atol=1e-10)
    assert torch.allclose(y1, y0 * torch.exp(-rates)[:, None], rtol=1e-7)
    assert evaluations[1] > evaluations[0]


def test_ode_likelihood_matches_the_mixture_density():
    points = MIXTURE.sample(100, torch.Generator().manual_seed(3))
    truth = MIXTURE.log_prob(points, SIGMA_MIN)
    exact, _ = ode_log_likelihood(MIXTURE.denoise, points, SIGMA_MIN, SIGMA_MAX, trace="exact", rtol=1e-5, atol=1e-5)
    assert (exact - truth).abs().max() / MIXTURE.dim < 0.05  # nats per dimension, at every point
    many = MIXTURE.sample(1000, torch.Generator().manual_seed(5))
    estimate, _ = ode_log_likelihood(MIXTURE.denoise, many, SIGMA_MIN, SIGMA_MAX, trace="hutchinson",
                                     generator=torch.Generator().manual_seed(4), rtol=1e-5, atol=1e-5)
    truth = MIXTURE.log_prob(many, SIGMA_MIN)
    assert (estimate - truth).abs().max() > 0.1  # a one-probe estimate is noisy per point ...
    assert (estimate.mean() - truth.mean()).abs() / MIXTURE.dim < 0.05  # ... and unbiased on average
    assert bits_per_dim(truth, MIXTURE.dim).mean().item() == pytest.approx(
        -truth.mean().item() / (MIXTURE.dim * math.log(2)))


def test_prior_is_the_unit_gaussian_in_scaled_coordinates():
    x = torch.randn(4, 3, dtype=torch.float64)
    sigma = 7.0
    expected = torch.distributions.Normal(0.0, math.sqrt(1 + sigma**2)).log_prob(x).sum(1)
    assert torch.allclose(prior_log_prob(x, sigma), expected)


def oracle_model(prediction: str, alphas_cumprod: torch.Tensor):
    """The network output (ε or v) that the mixture's exact denoiser implies at input x_t and timestep t."""
    log_sigmas = sigma_from_alpha_bar(alphas_cumprod.double()).log()

    def model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        position = float(t)
        low = min(int(position), len(log_sigmas) - 2)
        sigma = (log_sigmas[low] + (position - low) * (log_sigmas[low + 1] - log_sigmas[low])).exp()
        alpha_bar = alpha_bar_from_sigma(sigma)
        x0 = MIXTURE.denoise(xt / alpha_bar.sqrt(), sigma)
        eps = (xt - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return velocity(x0, eps, alpha_bar) if prediction == "v_prediction" else eps

    return model


def sample_with_scheduler(scheduler, steps: int, prediction: str) -> torch.Tensor:
    """The pipeline's loop (scale_model_input, model, step) over 2-D 'latents', with the oracle as the model."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(COUNT, 2, dtype=torch.float64, generator=generator) * scheduler.init_noise_sigma
    model = oracle_model(prediction, scheduler.alphas_cumprod)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = 0
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("sampler", SCHEDULER_SAMPLERS)
def test_every_diffusers_sampler_reproduces_the_mixture_on_the_cosine_schedule(sampler):
    config = scheduler_config("cosine", 1000, "v_prediction")
    assert_reproduces_mixture(sample_with_scheduler(make_scheduler(sampler, config), 100, "v_prediction"))


def test_heun_from_the_cosine_schedules_last_sigma_needs_an_euler_first_step():
    """diffusers' Heun takes its first step from σ_T ≈ 2·10⁴ to σ ≈ 26 with the trapezoid rule, which multiplies
    the second slope's x̂_0/σ term by σ_T: the samples land far from the data (t2i's `heun` steps Euler there)."""
    config = scheduler_config("cosine", 1000, "v_prediction")
    with pytest.raises(AssertionError):
        assert_reproduces_mixture(sample_with_scheduler(HeunDiscreteScheduler.from_config(config), 40, "v_prediction"))
    heun = make_scheduler("heun", config)
    assert_reproduces_mixture(sample_with_scheduler(heun, 40, "v_prediction"))
    heun.set_timesteps(40)
    assert len(heun.timesteps) == 2 * 40 - 2  # one evaluation for the Euler step, two for each later step
