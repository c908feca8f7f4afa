"""A diffusers-format Stable Diffusion folder gives the same images through t2i as through diffusers."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from t2i import Text2ImagePipeline
from t2i.diffusion.samplers import SAMPLERS

from conftest import save_tiny_sd_pipeline

PROMPTS = ["a large red circle", "a small blue square on the left"]
NEGATIVES = ["a green triangle", ""]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a", "ddim"])
def test_images_match_stable_diffusion_pipeline(sd_folder, sampler):
    reference = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    scheduler_class, settings = SAMPLERS[sampler]
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config, **settings)
    reference.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(7 + i) for i in range(len(PROMPTS))]
    expected = reference(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=6, guidance_scale=6.0,
                         generator=generators, output_type="np").images
    expected = (expected * 255).round().astype(np.int16)

    pipe = Text2ImagePipeline.from_pretrained(sd_folder, device="cpu")
    images = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=6, guidance_scale=6.0, seed=7,
                  sampler=sampler)
    ours = np.stack([np.asarray(image) for image in images]).astype(np.int16)

    assert ours.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(ours - expected).max() <= 2
    assert ours.std() > 0  # a real image, not a constant


def test_stable_diffusion_folder_round_trips_through_t2i_format(sd_folder, tmp_path):
    pipe = Text2ImagePipeline.from_pretrained(sd_folder, device="cpu")
    pipe.save_pretrained(tmp_path / "copy")
    again = Text2ImagePipeline.from_pretrained(tmp_path / "copy", device="cpu")
    first = pipe("a red circle", num_inference_steps=3, seed=1)[0]
    second = again("a red circle", num_inference_steps=3, seed=1)[0]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert again.vae.config.scaling_factor == pytest.approx(0.6)


def test_ddim_scheduler_config_is_kept(sd_folder):
    pipe = Text2ImagePipeline.from_pretrained(sd_folder, device="cpu")
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"
    assert isinstance(DDIMScheduler.from_config(pipe.scheduler_config), DDIMScheduler)
