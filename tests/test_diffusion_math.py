"""Schedules, parameterisations, losses and guidance against known values and diffusers' own numbers."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from t2i.config import TrainConfig
from t2i.diffusion.guidance import (
    classifier_free_guidance,
    dynamic_threshold,
    rescale_guidance,
)
from t2i.diffusion.losses import diffusion_loss, min_snr_weights
from t2i.diffusion.parameterization import (
    add_noise,
    eps_from_v,
    training_target,
    velocity,
    x0_from_eps,
    x0_from_prediction,
    x0_from_v,
)
from t2i.diffusion.samplers import SAMPLERS, make_scheduler
from t2i.diffusion.schedules import (
    COSINE_OFFSET,
    alphas_cumprod,
    betas,
    cosine_alpha_bar,
    log_snr,
    rescale_zero_terminal_snr,
    scheduler_alphas_cumprod,
    scheduler_config,
    snr,
    timestep_from_sigma,
)
from t2i.errors import T2IError
from t2i.training.loop import lr_multiplier

T = 1000


def test_linear_schedule_matches_ddpm_endpoints():
    b = betas("linear", T)
    assert b[0].item() == pytest.approx(1e-4)
    assert b[-1].item() == pytest.approx(0.02)
    assert b[1].item() - b[0].item() == pytest.approx((0.02 - 1e-4) / (T - 1))


def test_scaled_linear_schedule_is_stable_diffusions():
    b = betas("scaled_linear", T)
    assert b[0].item() == pytest.approx(0.00085)
    assert b[-1].item() == pytest.approx(0.012)
    t = 500
    expected = (0.00085**0.5 + t / (T - 1) * (0.012**0.5 - 0.00085**0.5)) ** 2  # linear in √β
    assert b[t].item() == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_follows_improved_ddpm_eq17():
    a = alphas_cumprod("cosine", T)
    f0 = math.cos(COSINE_OFFSET / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):
        expected = cosine_alpha_bar(torch.tensor((t + 1) / T, dtype=torch.float64)).item() / f0
        assert a[t].item() == pytest.approx(expected, rel=1e-9)
    assert betas("cosine", T).max().item() <= 0.999


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_schedules_agree_with_diffusers_scheduler_config(schedule):
    reference = DDPMScheduler.from_config(scheduler_config(schedule, T, "epsilon"))
    assert torch.allclose(alphas_cumprod(schedule, T).float(), reference.alphas_cumprod, atol=1e-6)


def test_snr_known_value():
    assert snr(torch.tensor(0.5)).item() == pytest.approx(1.0)
    assert snr(torch.tensor(0.8)).item() == pytest.approx(4.0)


def test_forward_process_and_velocity_match_diffusers():
    reference = DDPMScheduler.from_config(scheduler_config("cosine", T, "v_prediction"))
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = reference.alphas_cumprod[t]
    assert torch.allclose(add_noise(x0, noise, a), reference.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(velocity(x0, noise, a), reference.get_velocity(x0, noise, t), atol=1e-5)


def test_parameterisations_invert_each_other():
    x0, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    a = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    xt = add_noise(x0, eps, a)
    v = velocity(x0, eps, a)
    assert torch.allclose(x0_from_eps(xt, eps, a), x0)
    assert torch.allclose(x0_from_v(xt, v, a), x0)
    assert torch.allclose(eps_from_v(xt, v, a), eps)
    assert torch.equal(training_target("epsilon", x0, eps, a), eps)
    assert torch.allclose(training_target("v_prediction", x0, eps, a), v)
    assert torch.equal(training_target("sample", x0, eps, a), x0)
    assert torch.allclose(x0_from_prediction("sample", xt, x0, a), x0)
    assert torch.allclose(x0_from_prediction("v_prediction", xt, v, a), x0)
    with pytest.raises(ValueError, match="valid: epsilon, v_prediction, sample"):
        training_target("x0", x0, eps, a)


def test_min_snr_weights_known_values():
    a = torch.tensor([0.5, 0.9, 0.1])  # SNR 1, 9, 1/9
    eps = min_snr_weights(a, gamma=5.0, prediction="epsilon")
    v = min_snr_weights(a, gamma=5.0, prediction="v_prediction")
    assert eps.tolist() == pytest.approx([1.0, 5 / 9, 1.0])
    assert v.tolist() == pytest.approx([0.5, 5 / 10, (1 / 9) / (1 / 9 + 1)])
    assert min_snr_weights(a, gamma=5.0, prediction="sample").tolist() == pytest.approx([1.0, 5.0, 1 / 9])


def test_diffusion_loss_is_weighted_mse():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    assert diffusion_loss(prediction, prediction).item() == 0
    assert diffusion_loss(prediction, target).item() == pytest.approx((1 + 4) / 2)
    assert diffusion_loss(prediction, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)


def test_guidance_one_is_the_conditional_prediction():
    uncond, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(classifier_free_guidance(uncond, cond, 1.0), cond, atol=1e-6)
    assert torch.allclose(classifier_free_guidance(uncond, cond, 0.0), uncond, atol=1e-6)
    assert torch.allclose(classifier_free_guidance(uncond, cond, 3.0), 3 * cond - 2 * uncond, atol=1e-6)


def test_every_sampler_builds_and_unknown_names_are_listed():
    config = scheduler_config("cosine", T, "v_prediction")
    for name in SAMPLERS:
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(5)
        assert scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(T2IError, match="unknown sampler 'plms'.*ddpm, ddim, dpmpp_2m, dpmpp_sde, euler, euler_a, heun, "
                                       "heun_karras, lms, unipc, pc, annealed_langevin, pf_ode"):
        make_scheduler("plms", config)
    with pytest.raises(T2IError, match="sampler 'pc' is written in t2i and has no diffusers scheduler"):
        make_scheduler("pc", config)


def test_euler_ancestral_keeps_its_noise_levels_finite_at_the_cosine_schedules_sigma_max():
    """diffusers' float32 σ_down is NaN at 3 trailing steps of the cosine schedule; t2i then takes float64 σ,
    and elsewhere steps exactly as diffusers' does."""
    from diffusers import EulerAncestralDiscreteScheduler

    from t2i.diffusion.samplers import set_timesteps

    config = scheduler_config("cosine", T, "v_prediction")

    def sample(scheduler, steps: int) -> torch.Tensor:
        set_timesteps(scheduler, "euler_a", steps, torch.device("cpu"))
        x = torch.ones(1, 4, 4, 4) * scheduler.init_noise_sigma
        generator = torch.Generator().manual_seed(0)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(0.1 * model_input, t, x, generator=generator).prev_sample
        return x

    assert torch.isfinite(sample(make_scheduler("euler_a", config), 3)).all()
    for steps in (4, 10):
        assert torch.equal(sample(make_scheduler("euler_a", config), steps),
                           sample(EulerAncestralDiscreteScheduler.from_config(config), steps))


def test_learning_rate_warms_up_then_decays_to_its_floor():
    config = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine", final_learning_rate_fraction=0.1)
    assert lr_multiplier(0, config) == pytest.approx(0.1)
    assert lr_multiplier(9, config) == pytest.approx(1.0)
    assert lr_multiplier(60, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, config) == pytest.approx(0.1)
    linear = TrainConfig(steps=100, lr_schedule="linear", final_learning_rate_fraction=0.0)
    assert lr_multiplier(50, linear) == pytest.approx(0.5)
    assert lr_multiplier(50, TrainConfig(steps=100, lr_schedule="constant")) == 1.0


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescale_matches_lin_et_al_and_diffusers(schedule):
    from diffusers.schedulers.scheduling_ddim import (
        rescale_zero_terminal_snr as diffusers_rescale,
    )

    original = betas(schedule, T)
    rescaled = rescale_zero_terminal_snr(original)
    alpha_bar = torch.cumprod(1 - rescaled, dim=0)
    assert alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-12)  # SNR(T) = 0: the last step is pure noise
    assert alpha_bar[0].item() == pytest.approx(torch.cumprod(1 - original, 0)[0].item())  # the first is kept
    assert torch.allclose(rescaled.float(), diffusers_rescale(original.float()), atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_config_gives_every_sampler_the_rescaled_schedule(schedule):
    config = scheduler_config(schedule, T, "v_prediction", zero_terminal_snr=True)
    ours = scheduler_alphas_cumprod(config)
    assert ours[-1].item() == 0.0
    assert torch.allclose(ours.float(), DDPMScheduler.from_config(config).alphas_cumprod, atol=1e-6)
    assert make_scheduler("euler", config).config.rescale_betas_zero_snr
    from t2i.eval.likelihood import pipeline_sigma_range

    assert math.isfinite(pipeline_sigma_range(config)[1])  # the likelihood's ODE ends at a finite σ_T
    with pytest.raises(T2IError, match="cannot sample a zero-terminal-SNR schedule.*use one of ddpm, ddim"):
        make_scheduler("heun", config)


def test_zero_terminal_snr_pipeline_samples_with_diffusers_and_score_samplers():
    from conftest import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.scheduler_config = scheduler_config("cosine", T, "v_prediction", zero_terminal_snr=True)
    for sampler in ("euler_a", "pc", "pf_ode"):
        images = pipe(["a large red circle"], num_inference_steps=4, guidance_scale=3.0, seed=0, sampler=sampler)
        assert images[0].size == (32, 32), sampler


def test_zero_terminal_snr_trains_on_pure_noise_at_the_last_step():
    from conftest import build_tiny_pipeline
    from t2i.config import DiffusionConfig
    from t2i.training.randomness import BatchRandomness
    from t2i.training.stages.unet import UNetStage

    pipe = build_tiny_pipeline()
    config = scheduler_config("cosine", T, "v_prediction", zero_terminal_snr=True)
    stage = UNetStage(pipe.unet, pipe.vae, pipe.text_encoder, DiffusionConfig(zero_terminal_snr=True,
                      min_snr_gamma=5.0), config, [], torch.device("cpu"))
    assert stage.alpha_bar[-1].item() == 0.0
    batch = {"pixel_values": torch.rand(8, 3, 32, 32) * 2 - 1, "caption": ["a large red circle"] * 8}
    loss, _ = stage.loss(pipe.unet, batch, BatchRandomness(torch.Generator().manual_seed(0)))
    assert torch.isfinite(loss)
    x0, noise, last = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), stage.alpha_bar[-1:].expand(2)
    assert torch.equal(add_noise(x0, noise, last), noise)  # the model sees pure noise ...
    assert torch.equal(training_target("v_prediction", x0, noise, last), -x0)  # ... and learns the image
    assert torch.isfinite(min_snr_weights(last, 5.0, "v_prediction")).all()


def test_zero_terminal_snr_refuses_epsilon_prediction():
    from conftest import TINY_CONFIG
    from t2i.config import load_config
    from t2i.errors import ConfigError

    with pytest.raises(ConfigError, match="zero_terminal_snr needs diffusion.prediction v_prediction or sample"):
        load_config(TINY_CONFIG, ["diffusion.zero_terminal_snr=true", "diffusion.prediction=epsilon"])


def test_log_snr_and_timestep_from_sigma():
    assert log_snr(torch.tensor(0.5)).item() == pytest.approx(0.0)
    assert log_snr(torch.tensor(0.8)).item() == pytest.approx(math.log(4.0))
    train_sigmas = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    t = timestep_from_sigma(torch.tensor([0.1, 1.0, 10 ** 0.5, 10.0], dtype=torch.float64), train_sigmas)
    assert t.tolist() == pytest.approx([0.0, 1.0, 1.5, 2.0])


def test_guidance_rescale_matches_the_conditional_spread():
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    guided = classifier_free_guidance(uncond, cond, 7.0)
    rescaled = rescale_guidance(guided, cond, 1.0)
    assert torch.allclose(rescaled.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    assert torch.allclose(rescale_guidance(guided, cond, 0.7), 0.7 * rescaled + 0.3 * guided)


def test_dynamic_threshold_leaves_small_values_and_squeezes_saturated_ones():
    calm = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    assert torch.equal(dynamic_threshold(calm), calm)  # s = max(percentile, 1) = 1: nothing to do
    loud = calm.clone()
    loud[1] *= 4
    out = dynamic_threshold(loud, percentile=1.0)
    assert torch.equal(out[0], calm[0])
    assert out[1].abs().max().item() == pytest.approx(1.0)
    assert torch.allclose(out[1], loud[1] / loud[1].abs().max())
