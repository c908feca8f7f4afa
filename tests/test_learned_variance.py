"""Learned variances (Improved DDPM): the bound's terms against hand values and diffusers, the hybrid loss's
gradients, training and exact resume, sampling with `ddpm` (variance used) and the rest (prediction half only),
save/load and export."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from t2i.config import load_config
from t2i.diffusion.losses import diffusion_loss
from t2i.diffusion.parameterization import add_noise, training_target
from t2i.diffusion.schedules import scheduler_alphas_cumprod, scheduler_config
from t2i.diffusion.vlb import (
    LEARNED_RANGE,
    gaussian_nll,
    hybrid_loss,
    learned_log_variance,
    log_variance_bounds,
    normal_kl,
    posterior_mean,
    posterior_variance,
    vlb_terms,
)
from t2i.models.unet import build_unet
from t2i.pipeline import Text2ImagePipeline
from t2i.pipeline.export import export_diffusers, without_variance
from t2i.training.loop import FINAL
from t2i.training.run import run_training
from t2i.training.stages.unet import UNetStage

from conftest import TINY_CONFIG, build_tiny_pipeline, killed_at_loss_call, tiny_config

# A three-step schedule whose posterior is worked out by hand below.
ALPHA_BAR = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
PROMPTS = ["a large red circle", "a small blue square"]


def test_posterior_of_a_hand_worked_schedule():
    # t = 1: β_1 = 1 − 0.6/0.9 = 1/3, β̃_1 = (1 − 0.9)/(1 − 0.6) · β_1 = 1/12; at t = 0, β̃_0 = 0.
    torch.testing.assert_close(posterior_variance(ALPHA_BAR)[:2], torch.tensor([0.0, 1 / 12], dtype=torch.float64))
    log_tilde, log_beta = log_variance_bounds(ALPHA_BAR)
    assert log_tilde[0] == log_tilde[1] == math.log(1 / 12)  # clipped at t = 0, as the paper's code
    assert log_beta[1].item() == pytest.approx(math.log(1 / 3))
    x0, xt = torch.full((1, 1), 2.0), torch.full((1, 1), -1.0)
    expected = math.sqrt(0.9) * (1 / 3) / 0.4 * 2.0 + math.sqrt(2 / 3) * 0.1 / 0.4 * -1.0
    assert posterior_mean(x0, xt, ALPHA_BAR, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-6)
    assert posterior_mean(x0, xt, ALPHA_BAR, torch.tensor([0])).item() == pytest.approx(2.0)  # q(x_{-1}) is x_0


def test_learned_range_ends_and_diffusers_agree():
    """The network's −1 (the paper's v = 0) gives β̃_t, its 1 gives β_t; in between as diffusers' learned_range."""
    t = torch.tensor([1])
    ends = learned_log_variance(torch.tensor([[-1.0, 1.0]]), ALPHA_BAR, t).exp()[0]
    torch.testing.assert_close(ends, torch.tensor([1 / 12, 1 / 3]))
    config = {**scheduler_config("cosine", 1000, "v_prediction"), "variance_type": LEARNED_RANGE}
    alpha_bar = scheduler_alphas_cumprod(config)
    scheduler = DDPMScheduler.from_config(config)
    scheduler.set_timesteps(1000)
    for step in (1, 10, 500, 998):
        assert posterior_variance(alpha_bar)[step].item() == pytest.approx(
            scheduler._get_variance(step, variance_type="fixed_small").item(), rel=1e-3)
        for v in (-1.0, 0.3, 1.0):
            ours = learned_log_variance(torch.tensor([[v]]), alpha_bar, torch.tensor([step])).item()
            assert ours == pytest.approx(scheduler._get_variance(step, torch.tensor(v)).item(), rel=1e-4)


def test_gaussian_kl_and_nll():
    mean, log_var = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(normal_kl(mean, log_var, mean, log_var), torch.zeros(5))
    # KL(N(0, 1) ‖ N(1, e²)) = ½ (2 − 0 − 1 + e⁻² + e⁻²)
    value = normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)).item()
    assert value == pytest.approx(0.5 * (1 + 2 * math.exp(-2)))
    x = torch.randn(5)
    torch.testing.assert_close(gaussian_nll(x, mean, log_var),
                               -torch.distributions.Normal(mean, (0.5 * log_var).exp()).log_prob(x))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_the_bound_vanishes_for_the_true_mean_and_variance(prediction):
    config = scheduler_config("cosine", 1000, prediction)
    alpha_bar = scheduler_alphas_cumprod(config)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([3, 400, 999])
    xt = add_noise(x0, noise, alpha_bar[t])
    exact = training_target(prediction, x0, noise, alpha_bar[t])
    true_variance = -torch.ones_like(x0)
    assert vlb_terms(prediction, exact, true_variance, x0, xt, alpha_bar, t).abs().max() < 1e-8
    # A wrong variance or mean costs at t < T (near t = T, β̃_t ≈ β_t and the mean hardly depends on x̂_0).
    assert (vlb_terms(prediction, exact, -true_variance, x0, xt, alpha_bar, t)[:2] > 1e-6).all()
    assert (vlb_terms(prediction, exact + 0.1, true_variance, x0, xt, alpha_bar, t)[:2] > 1e-6).all()


def test_hybrid_loss_trains_the_variance_on_the_bound_and_the_mean_on_the_simple_loss_alone():
    alpha_bar = scheduler_alphas_cumprod(scheduler_config("cosine", 1000, "v_prediction"))
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 7, 300, 900])
    xt = add_noise(x0, noise, alpha_bar[t])
    target = training_target("v_prediction", x0, noise, alpha_bar[t])
    output = torch.randn(4, 8, 8, 8, requires_grad=True)
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    loss, vlb = hybrid_loss("v_prediction", output, target, x0, xt, alpha_bar, t, 0.001, weights)
    loss.backward()
    simple_output = output.detach()[:, :4].clone().requires_grad_(True)
    simple = diffusion_loss(simple_output, target, weights)  # Min-SNR weights act on L_simple only
    simple.backward()
    torch.testing.assert_close(output.grad[:, :4], simple_output.grad)  # no gradient from L_vlb into the mean
    assert output.grad[:, 4:].abs().min() > 0  # every variance element learns from L_vlb
    torch.testing.assert_close(loss, simple + 0.001 * 1000 * vlb)


def learned_variance_pipeline(variance: float | None = None) -> Text2ImagePipeline:
    """The tiny pipeline with a random learned-variance U-Net; `variance` fixes the variance half to that value."""
    pipe = build_tiny_pipeline()
    config = load_config(TINY_CONFIG)
    torch.manual_seed(1)
    unet = build_unet(config.unet, config.vae.latent_channels, pipe.text_encoder.hidden_size,
                      config.data.resolution // config.vae.latent_factor, learned_variance=True)
    if variance is not None:
        with torch.no_grad():
            unet.conv_out.weight[4:] = 0
            unet.conv_out.bias[4:] = variance
    return Text2ImagePipeline(pipe.vae, pipe.text_encoder, unet.eval(),
                              {**pipe.scheduler_config, "variance_type": LEARNED_RANGE}, pipe.defaults).to("cpu")


def mean_only(pipe: Text2ImagePipeline, variance_type: str | None = None) -> Text2ImagePipeline:
    """`pipe` without its variance half: a fixed-variance pipeline with the same predictions."""
    config = {k: v for k, v in pipe.scheduler_config.items() if k != "variance_type"}
    if variance_type:
        config["variance_type"] = variance_type
    return Text2ImagePipeline(pipe.vae, pipe.text_encoder, without_variance(pipe.unet), config, pipe.defaults)


def pixels(pipe: Text2ImagePipeline, sampler: str, **kwargs) -> np.ndarray:
    images = pipe(PROMPTS, sampler=sampler, seed=3, num_inference_steps=5, **kwargs)
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddpm_draws_with_the_learned_variance(guidance):
    """A variance half fixed at −1 samples as diffusers' fixed_small; at 1 differently: it reaches scheduler.step."""
    pipe = learned_variance_pipeline(-1.0)
    small = pixels(pipe, "ddpm", guidance_scale=guidance)
    assert np.abs(small - pixels(mean_only(pipe, "fixed_small"), "ddpm", guidance_scale=guidance)).max() <= 1
    assert np.abs(pixels(learned_variance_pipeline(1.0), "ddpm", guidance_scale=guidance) - small).max() > 10


def test_the_step_to_x0_adds_no_noise_whatever_the_variance_half_says():
    """One step goes from t = T − 1 straight to x_0, where β̃ = 0: a large v must not blow the image up."""
    pipe = learned_variance_pipeline(5.0)
    one_step = pipe(PROMPTS, sampler="ddpm", seed=3, num_inference_steps=1)
    fixed = mean_only(pipe, "fixed_small")(PROMPTS, sampler="ddpm", seed=3, num_inference_steps=1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one_step, fixed))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a", "pc"])
def test_other_samplers_use_the_prediction_half_alone(sampler):
    pipe = learned_variance_pipeline()
    assert np.array_equal(pixels(pipe, sampler), pixels(mean_only(pipe), sampler))


def test_save_and_load_keep_the_learned_variance(tmp_path):
    pipe = learned_variance_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert loaded.scheduler_config["variance_type"] == LEARNED_RANGE
    assert loaded.unet.config.out_channels == 2 * loaded.unet.config.in_channels
    assert np.array_equal(pixels(loaded, "ddpm"), pixels(pipe, "ddpm"))


def test_export_gives_diffusers_a_loadable_folder_for_every_sampler(tmp_path):
    pipe = learned_variance_pipeline()
    whole = StableDiffusionPipeline.from_pretrained(export_diffusers(pipe, tmp_path / "ddpm", sampler="ddpm"))
    assert whole.unet.config.out_channels == 8 and whole.scheduler.config.variance_type == LEARNED_RANGE
    images = whole(PROMPTS[:1], num_inference_steps=3, guidance_scale=3.0, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

    halved = StableDiffusionPipeline.from_pretrained(export_diffusers(pipe, tmp_path / "euler", sampler="euler_a"))
    assert halved.unet.config.out_channels == 4 and "variance_type" not in halved.scheduler.config
    generators = [torch.Generator("cpu").manual_seed(3 + i) for i in range(len(PROMPTS))]
    theirs = halved(PROMPTS, num_inference_steps=5, guidance_scale=3.0, generator=generators, output_type="np").images
    theirs = (theirs * 255).round().astype(np.int16)
    assert np.abs(theirs - pixels(pipe, "euler_a", guidance_scale=3.0)).max() <= 2


def test_config_checks_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="diffusion.vlb_weight must be positive"):
        tiny_config(tmp_path, "diffusion.learned_variance=true", "diffusion.vlb_weight=0")
    with pytest.raises(ValueError, match="diffusion.learned_variance applies to a U-Net trained here"):
        tiny_config(tmp_path, "stages=[finetune]", "finetune.model=x", "diffusion.learned_variance=true")


def test_training_with_learned_variance_runs_and_resumes_exactly(trained_run, tmp_path):
    """Only the U-Net trains (the tiny run's VAE and CLIP are reused); a run killed after its step-3 checkpoint
    and resumed ends with the uninterrupted run's weights; the pipeline records `learned_range`."""
    def reuse_encoders(run_dir):
        for stage in ("vae", "clip"):
            shutil.copytree(trained_run / stage, run_dir / stage)
        return tiny_config(run_dir, "diffusion.learned_variance=true")

    whole = reuse_encoders(tmp_path / "whole")
    run_training(whole, resume=True)
    pipeline = tmp_path / "whole" / "pipeline"
    assert json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == LEARNED_RANGE
    assert json.loads((pipeline / "unet" / "config.json").read_text())["out_channels"] == 8
    logged = [json.loads(line) for line in (tmp_path / "whole" / "unet" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(record["vlb_bits_per_dim"]) for record in logged if "loss" in record)

    interrupted = reuse_encoders(tmp_path / "interrupted")
    with killed_at_loss_call(UNetStage, 5):  # inside step 5, after the step-3 checkpoint
        run_training(interrupted, resume=True)
    run_training(interrupted, resume=True)
    for name in (f"{FINAL}/diffusion_pytorch_model.safetensors", "checkpoints/step_0000006/ema.safetensors"):
        resumed = load_file(tmp_path / "interrupted" / "unet" / name)
        uninterrupted = load_file(tmp_path / "whole" / "unet" / name)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), name
