"""Shared fixtures: tiny configs, tiny random pipelines and one tiny trained run, all built locally."""
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from t2i.config import RunConfig, load_config
from t2i.diffusion.schedules import scheduler_config
from t2i.models.text_encoder import OpenClipTextEncoder
from t2i.models.unet import build_unet
from t2i.models.vae import build_vae
from t2i.pipeline import Text2ImagePipeline

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def tiny_config(run_dir: Path, *overrides: str) -> RunConfig:
    return load_config(TINY_CONFIG, [f"run_dir={run_dir}", *overrides])


def build_tiny_pipeline(seed: int = 0, prediction: str = "v_prediction") -> Text2ImagePipeline:
    """Random-weight components at the sizes of configs/tiny.yaml."""
    config = load_config(TINY_CONFIG)
    torch.manual_seed(seed)
    vae = build_vae(config.vae, config.data.resolution)
    text_encoder = OpenClipTextEncoder.from_config(config.text_encoder, config.data.resolution)
    unet = build_unet(config.unet, config.vae.latent_channels, text_encoder.hidden_size,
                      config.data.resolution // config.vae.latent_factor)
    schedule = scheduler_config(config.diffusion.schedule, config.diffusion.num_train_timesteps, prediction)
    return Text2ImagePipeline(vae, text_encoder, unet, schedule,
                              defaults={"num_inference_steps": 4, "guidance_scale": 3.0}).to("cpu")


@pytest.fixture(scope="session")
def tiny_pipeline() -> Text2ImagePipeline:
    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run trained once through every stage; returns its run folder."""
    from t2i.training.run import run_training

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_training(tiny_config(run_dir))
    return run_dir


def copy_base_stages(trained_run: Path, run_dir: Path) -> None:
    """A new run folder holding `trained_run`'s finished VAE, CLIP and U-Net, for an extra stage to train on."""
    run_dir.mkdir(parents=True)
    for stage in ("vae", "clip", "unet"):
        shutil.copytree(trained_run / stage / "final", run_dir / stage / "final")


def save_tiny_sd_pipeline(folder: Path, safe_serialization: bool = True) -> Path:
    """A tiny random Stable Diffusion folder, built and saved with diffusers (no download)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from t2i.models.text_encoder import write_hf_tokenizer_files

    torch.manual_seed(0)
    tokenizer_files = write_hf_tokenizer_files(folder.parent / f"{folder.name}_tokenizer_files")
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
    pipe.save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


@contextmanager
def killed_at_loss_call(stage_class: type, call: int):
    """Inside the block, `stage_class.loss` raises KeyboardInterrupt at its `call`-th call, as a kill mid-step would
    leave a run; the block must end by that interrupt. The real loss is back afterwards, for the resume."""
    real_loss, calls = stage_class.loss, [0]

    def crashing_loss(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real_loss(self, *args, **kwargs)

    stage_class.loss = crashing_loss
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        stage_class.loss = real_loss
