"""Stage sr and the cascade on tiny models: the conditioning math, shapes through the stage, the noise level
honoured, save/load with sr/, upscaling end to end (API and CLI), export, and exact resume."""
import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from t2i import Text2ImagePipeline
from t2i.cli import main
from t2i.config import load_config
from t2i.diffusion.super_resolution import (
    area_downsample,
    augment_condition,
    augmentation_alpha_bar,
    residual_scale,
    upsample,
)
from t2i.errors import T2IError
from t2i.models.sr_unet import build_sr_unet
from t2i.pipeline.export import export_diffusers
from t2i.pipeline.upscaler import Upscaler
from t2i.training.checkpoint import latest_checkpoint
from t2i.training.randomness import BatchRandomness
from t2i.training.run import run_training
from t2i.training.stages.sr import SRStage

from conftest import TINY_CONFIG, build_tiny_pipeline, copy_base_stages, killed_at_loss_call, tiny_config

PROMPTS = ["a large red circle", "a small blue square on the left"]


def tiny_upscaler(pipe: Text2ImagePipeline, seed: int = 0) -> Upscaler:
    config = load_config(TINY_CONFIG).sr
    torch.manual_seed(seed)
    unet = build_sr_unet(config, pipe.text_encoder.hidden_size, 64)
    return Upscaler(unet, pipe.scheduler_config, config.factor, config.patch_size, config.residual,
                    config.max_noise_level, {"num_inference_steps": 2, "noise_level": 20}, residual_scale=4.0)


@pytest.fixture(scope="module")
def cascade() -> Text2ImagePipeline:
    pipe = build_tiny_pipeline()
    pipe.sr = tiny_upscaler(pipe)
    return pipe.to("cpu")


def test_level_zero_keeps_the_condition_exact_and_higher_levels_follow_the_schedule():
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
    low = torch.rand(3, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(low)
    levels = torch.tensor([0, 1, 500])
    out = augment_condition(low, noise, levels, alphas_cumprod)
    assert torch.equal(out[0], low[0])
    assert augmentation_alpha_bar(levels, alphas_cumprod).tolist() == pytest.approx([1.0, 0.99, alphas_cumprod[499].item()])
    a = alphas_cumprod[499]
    assert torch.allclose(out[2], a.sqrt() * low[2] + (1 - a).sqrt() * noise[2])


def test_area_downsample_averages_blocks_and_bicubic_keeps_flat_images():
    image = torch.arange(16.0).reshape(1, 1, 4, 4) / 16
    assert area_downsample(image, 2).flatten().tolist() == pytest.approx([2.5 / 16, 4.5 / 16, 10.5 / 16, 12.5 / 16])
    flat = torch.full((1, 3, 8, 8), 0.25)
    assert torch.allclose(upsample(flat, 2), torch.full((1, 3, 16, 16), 0.25))


def test_the_residual_scale_gives_what_bicubic_misses_unit_variance():
    high = torch.rand(4, 3, 16, 16) * 2 - 1
    missed = high - upsample(area_downsample(high, 2), 2)
    assert (missed * residual_scale(high, 2)).std().item() == pytest.approx(1.0, rel=1e-4)


def test_the_stage_loss_and_the_network_take_the_shapes_they_should(cascade):
    sr = cascade.sr
    stage = SRStage(sr, cascade.text_encoder, load_config(TINY_CONFIG).diffusion, {}, torch.device("cpu"))
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "caption": PROMPTS}
    loss, _ = stage.loss(sr.unet, batch, BatchRandomness(torch.Generator().manual_seed(0)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in sr.unet.parameters() if p.requires_grad)
    sr.unet.zero_grad(set_to_none=True)
    low = area_downsample(batch["pixel_values"], 2)  # (2, 3, 32, 32)
    condition = sr.condition(low, torch.randn_like(low), torch.tensor([0, 10]))
    assert condition.shape == (2, 3, 64, 64)
    with torch.no_grad():
        out = sr.predict(sr.unet, torch.randn(2, 3, 64, 64), condition, torch.tensor([5, 500]),
                         cascade.encode_prompts(PROMPTS), torch.tensor([0, 10]))
    assert out.shape == (2, 3, 64, 64)


def test_the_stage_weights_its_loss_by_its_own_min_snr_gamma(cascade):
    """sr.min_snr_gamma, not diffusion.min_snr_gamma (which the base stage uses), decides the SR loss's weights."""
    sr, diffusion = cascade.sr, load_config(TINY_CONFIG, ["diffusion.min_snr_gamma=5"]).diffusion
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "caption": PROMPTS}
    losses = {}
    for gamma in (None, 5.0):
        stage = SRStage(sr, cascade.text_encoder, diffusion, {}, torch.device("cpu"), min_snr_gamma=gamma)
        with torch.no_grad():
            losses[gamma], _ = stage.loss(sr.unet, batch, BatchRandomness(torch.Generator().manual_seed(0)))
    assert losses[None].item() != pytest.approx(losses[5.0].item(), rel=1e-3)


def test_the_noise_level_is_honoured(cascade):
    sr = cascade.sr
    inputs = (torch.randn(1, 3, 64, 64), torch.zeros(1, 3, 64, 64), torch.tensor([300]),
              cascade.encode_prompts(PROMPTS[:1]))
    with torch.no_grad():  # the class embedding alone: same pixels in, other level, other prediction
        first, again, other = (sr.predict(sr.unet, *inputs, torch.tensor([level])) for level in (0, 0, 100))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    images = cascade(PROMPTS, seed=0)
    at_zero = cascade.upscale(images, PROMPTS, noise_level=0, seed=0)
    assert [image.size for image in at_zero] == [(64, 64)] * 2
    assert _pixels(at_zero) == _pixels(cascade.upscale(images, PROMPTS, noise_level=0, seed=0))
    assert _pixels(at_zero) != _pixels(cascade.upscale(images, PROMPTS, noise_level=200, seed=0))


def test_generate_with_upscale_is_generate_then_upscale(cascade):
    direct = cascade(PROMPTS, seed=3, upscale=True)
    assert [image.size for image in direct] == [(64, 64)] * 2
    two_steps = cascade.upscale(cascade(PROMPTS, seed=3), PROMPTS, seed=3)
    assert _pixels(direct) == _pixels(two_steps)


@pytest.mark.parametrize("sampler", ["euler_a", "ddpm", "dpmpp_sde"])
def test_a_stochastic_sampler_upscales_each_image_from_its_own_seed(cascade, sampler):
    """Their step noise was drawn from the global RNG: the same seed gave another image at every call."""
    images = cascade(PROMPTS, seed=0, num_inference_steps=1)
    together = cascade.upscale(images, PROMPTS, seed=[5, 9], sampler=sampler)
    assert _pixels(together) == _pixels(cascade.upscale(images, PROMPTS, seed=[5, 9], sampler=sampler))
    alone = cascade.upscale(images[1:], PROMPTS[1:], seed=9, sampler=sampler)
    assert np.abs(np.asarray(together[1], dtype=int) - np.asarray(alone[0], dtype=int)).max() <= 1


def test_bad_upscale_calls_are_one_clear_error(cascade):
    plain = build_tiny_pipeline()
    with pytest.raises(T2IError, match="no super-resolution stage"):
        plain("a red circle", upscale=True)
    images = [Image.new("RGB", (32, 32)), Image.new("RGB", (40, 40))]
    with pytest.raises(T2IError, match="must have one size"):
        cascade.upscale(images, "a red circle")
    with pytest.raises(T2IError, match="noise_level must lie in"):
        cascade.upscale(images[:1], "a red circle", noise_level=10_000)
    with pytest.raises(T2IError, match="must be a multiple of"):
        cascade.upscale([Image.new("RGB", (33, 33))], "a red circle")
    with pytest.raises(T2IError, match="guidance_scale must be a finite number; got nan"):
        cascade.upscale(images[:1], "a red circle", guidance_scale=float("nan"))


@pytest.mark.parametrize("arguments, message", [
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer; got 2.5"),
    (dict(num_inference_steps=5000), r"num_inference_steps must be in \[1, 1000\]; got 5000"),
    (dict(noise_level=1.5), "noise_level must be an integer; got 1.5"),
])
def test_upscale_arguments_of_the_wrong_type_or_range_are_refused(cascade, arguments, message):
    """2.5 steps and noise level 1.5 were taken (the level cut to 1); 5000 steps ended in an IndexError."""
    with pytest.raises(T2IError, match=message):
        cascade.upscale([Image.new("RGB", (32, 32))], "a red circle", **arguments)


def test_a_16_bit_image_is_upscaled_as_its_8_bit_levels_not_clipped_white(cascade):
    levels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60  # 0..61380 of 65535
    sixteen = Image.fromarray(levels)
    eight = Image.fromarray((levels / 257).round().astype(np.uint8))
    assert sixteen.mode.startswith("I;16") and eight.mode == "L"
    assert _pixels(cascade.upscale([sixteen], "a red circle", seed=0)) == \
        _pixels(cascade.upscale([eight], "a red circle", seed=0))


def test_a_pipeline_saves_and_loads_its_sr_stage(cascade, tmp_path):
    cascade.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "sr" / "sr.json").is_file()
    again = Text2ImagePipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert again.sr.defaults == cascade.sr.defaults and again.sr.factor == 2 and again.sr.residual_scale == 4.0
    images = cascade(PROMPTS, seed=1)
    assert _pixels(cascade.upscale(images, PROMPTS, seed=1)) == _pixels(again.upscale(images, PROMPTS, seed=1))
    build_tiny_pipeline().save_pretrained(tmp_path / "plain")
    assert Text2ImagePipeline.from_pretrained(tmp_path / "plain", device="cpu").sr is None


def test_an_exported_folder_keeps_the_sr_stage(cascade, tmp_path):
    from diffusers import StableDiffusionPipeline

    export_diffusers(cascade, tmp_path / "sd")
    StableDiffusionPipeline.from_pretrained(tmp_path / "sd")  # diffusers ignores sr/
    again = Text2ImagePipeline.from_pretrained(tmp_path / "sd", device="cpu")
    images = cascade(PROMPTS, seed=1)
    assert _pixels(cascade.upscale(images, PROMPTS, seed=1)) == _pixels(again.upscale(images, PROMPTS, seed=1))


def test_the_upscale_and_generate_commands(cascade, tmp_path, capsys):
    cascade.save_pretrained(tmp_path / "pipe")
    cascade(PROMPTS[0], seed=0)[0].save(tmp_path / "low.png")
    assert main(["upscale", str(tmp_path / "low.png"), str(tmp_path / "low.png"), "--model", str(tmp_path / "pipe"),
                 "--prompt", PROMPTS[0], "--noise-level", "0", "--out", str(tmp_path / "up.png")]) == 0
    assert Image.open(tmp_path / "up-0.png").size == (64, 64) and (tmp_path / "up-1.png").is_file()
    assert main(["generate", PROMPTS[0], "--model", str(tmp_path / "pipe"), "--upscale",
                 "--out", str(tmp_path / "gen.png")]) == 0
    assert Image.open(tmp_path / "gen.png").size == (64, 64)
    assert main(["upscale", str(tmp_path / "missing.png"), "--model", str(tmp_path / "pipe"), "--prompt", "x"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_the_sr_stage_trains_into_the_pipeline_and_resumes_exactly(trained_run, tmp_path):
    """Stop stage sr inside step 3, after its step-2 checkpoint; resume; compare with an uninterrupted run."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for run_dir in (full, resumed):
        copy_base_stages(trained_run, run_dir)
    run_training(tiny_config(full, "stages=[vae,clip,unet,sr]"), resume=True)
    pipe = Text2ImagePipeline.from_pretrained(full / "pipeline", device="cpu")
    assert pipe.sr is not None and pipe.sr.defaults["noise_level"] == 20
    records = [json.loads(line) for line in (full / "sr" / "metrics.jsonl").read_text().splitlines()]
    assert any("psnr" in record and "psnr_bicubic" in record for record in records)

    with killed_at_loss_call(SRStage, 3):
        run_training(tiny_config(resumed, "stages=[vae,clip,unet,sr]"), resume=True)
    assert latest_checkpoint(resumed / "sr").name == "step_0000002"
    run_training(tiny_config(resumed, "stages=[vae,clip,unet,sr]"), resume=True)
    for name in ("final/unet/diffusion_pytorch_model.safetensors", "checkpoints/step_0000004/ema.safetensors"):
        ours, theirs = load_file(resumed / "sr" / name), load_file(full / "sr" / name)
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


def test_a_resume_that_does_not_list_the_trained_sr_stage_keeps_it_in_the_pipeline(trained_run, tmp_path):
    """The pipeline is assembled again by every run in the folder: one with the default stages (or another
    added stage) must not drop the SR stage trained there before."""
    run_dir = tmp_path / "run"
    copy_base_stages(trained_run, run_dir)
    run_training(tiny_config(run_dir, "stages=[vae,clip,unet,sr]", "train.sr.steps=1"), resume=True)
    run_training(tiny_config(run_dir, "train.sr.steps=1"), resume=True)  # stages: [vae, clip, unet]
    assert Text2ImagePipeline.from_pretrained(run_dir / "pipeline", device="cpu").sr is not None


def test_a_4x_stage_upscales_by_four_and_saves_its_factor(cascade, tmp_path):
    config = replace(load_config(TINY_CONFIG).sr, factor=4)
    torch.manual_seed(0)
    unet = build_sr_unet(config, cascade.text_encoder.hidden_size, 64)
    four = Upscaler(unet, cascade.scheduler_config, 4, config.patch_size, config.residual, config.max_noise_level,
                    {"num_inference_steps": 2, "noise_level": 20}, residual_scale=4.0)
    low = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (16, 16), (30, 30, 200))]
    pipe = copy.copy(cascade)
    pipe.sr = four
    assert [image.size for image in pipe.upscale(low, PROMPTS, seed=0)] == [(64, 64), (64, 64)]
    four.save_pretrained(tmp_path / "sr")
    assert Upscaler.from_pretrained(tmp_path / "sr").factor == 4


def test_casting_the_sr_stage_prints_no_diffusers_warning(cascade, monkeypatch):
    """`pipe.to(torch.bfloat16)` and `speed_up` cast the SR U-Net with diffusers' own `to`, which warned "set
    `torch_dtype` in `from_pretrained()` instead", advice a t2i user cannot follow; the base networks never did."""
    from diffusers.models import modeling_utils

    warned = []
    monkeypatch.setattr(modeling_utils.logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    sr = tiny_upscaler(cascade).to(torch.device("cpu"), torch.bfloat16)
    assert next(sr.unet.parameters()).dtype == torch.bfloat16
    assert warned == []


def test_a_4x_stage_on_shapes_is_checked_against_the_sizes_shapes_are_drawn_at():
    with pytest.raises(ValueError, match="renders shapes at data.resolution x sr.factor = 256"):
        load_config(TINY_CONFIG, ["stages=[vae,clip,unet,sr]", "data.resolution=64", "sr.factor=4"])


def _pixels(images):
    return [image.tobytes() for image in images]
