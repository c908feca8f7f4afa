"""Stable-Diffusion-shaped pipelines of named sizes with random weights, saved in diffusers' format, for the
benchmarks (scripts/bench_generate.py, scripts/bench_train.py). Nothing is downloaded: the tokenizer files are
written from the BPE table open_clip ships.

    tiny   U-Net (32, 64) ≈ 1 M, VAE factor 2, CLIP text 2 layers of 32: 32 px, for checking the scripts
    small  U-Net (64, 128, 256) ≈ 18 M, VAE factor 4, CLIP text 4 layers of 256: 64 px
    sd15   Stable Diffusion 1.5's sizes (U-Net 860 M, VAE factor 8, CLIP ViT-L/14 text): 512 px
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Size:
    resolution: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    # diffusers' `attention_head_dim` of UNet2DConditionModel: the number of heads (diffusers issue #2011).
    unet_heads: int | tuple[int, ...]
    vae_channels: tuple[int, ...]
    vae_layers: int
    text_width: int
    text_layers: int
    text_heads: int


SIZES = {
    "tiny": Size(32, (32, 64), 1, 4, (32, 64), 1, 32, 2, 4),
    "small": Size(64, (64, 128, 256), 2, 8, (64, 128, 256), 2, 256, 4, 4),
    "sd15": Size(512, (320, 640, 1280, 1280), 2, 8, (128, 256, 512, 512), 2, 768, 12, 12),
}


def build_pipeline_folder(size_name: str, folder: Path, seed: int = 0) -> Path:
    """A random-weight Stable Diffusion folder of size `size_name` (diffusers' `save_pretrained` layout)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from t2i.models.text_encoder import write_hf_tokenizer_files

    size = SIZES[size_name]
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    levels = len(size.unet_channels)
    # Cross-attention at every level but the lowest, as Stable Diffusion.
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    vae_levels = len(size.vae_channels)
    latent_size = size.resolution // 2 ** (vae_levels - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=size.unet_channels,
        layers_per_block=size.unet_layers, down_block_types=down, up_block_types=up,
        cross_attention_dim=size.text_width, attention_head_dim=size.unet_heads)
    vae = AutoencoderKL(block_out_channels=size.vae_channels, layers_per_block=size.vae_layers,
                        down_block_types=("DownEncoderBlock2D",) * vae_levels,
                        up_block_types=("UpDecoderBlock2D",) * vae_levels, latent_channels=4,
                        sample_size=size.resolution, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=size.text_width, intermediate_size=4 * size.text_width,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tokenizer_files = write_hf_tokenizer_files(folder.parent / f"{folder.name}-tokenizer-files")
    tokenizer = CLIPTokenizer(str(tokenizer_files / "vocab.json"), str(tokenizer_files / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
