"""Shared fixtures: tiny configs, tiny random pipelines and one tiny trained run, all built locally."""
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
