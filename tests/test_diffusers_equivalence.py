"""A diffusers-format Stable Diffusion folder gives the same images through t2i as through diffusers."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from t2i import Text2ImagePipeline
from t2i.diffusion.samplers import SAMPLERS
from t2i.models.text_encoder import write_hf_tokenizer_files

PROMPTS = ["a large red circle", "a small blue square on the left"]
NEGATIVES = ["a green triangle", ""]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny random Stable Diffusion folder, built and saved with diffusers (no download)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_sd")
    tokenizer_files = write_hf_tokenizer_files(folder / "tokenizer_src")
    tokenizer = CLIPTokenizer(str(tokenizer_files / "vocab.json"), str(tokenizer_files / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4)
    # A scaling factor far from SD's 0.18215, to check that t2i reads it from the VAE's config.
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        scaling_factor=0.6)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


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
