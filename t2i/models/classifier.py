"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, "Diffusion models beat GANs", §4):
p_φ(y | x_t, t) on the U-Net's noisy latents, one softmax head per label (for shapes: colour and shape).

Its trunk is the downsampling half of a U-Net, as theirs is: conv_in, a sinusoidal timestep embedding, diffusers'
`DownBlock2D` per level (ResNet blocks that read the embedding, a downsample between levels). They pool with
attention; at 8×8 latents the last level is 4×4 or smaller, so mean pooling loses little and costs nothing.
The label vocabularies are part of the config, so a saved classifier (config.json + safetensors) knows its words.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import DownBlock2D

# Label of an item (or a prompt) that says nothing about a head: cross-entropy skips it, guidance leaves it.
IGNORE_LABEL = -100  # torch's own default ignore_index
TIME_EMBED_FACTOR = 4  # time-embedding width over the first level's, as in diffusers' U-Nets
NORM_EPS = 1e-5


class NoisyLatentClassifier(ModelMixin, ConfigMixin):
    """Logits {label name: (B, classes)} for noisy latents (B, C, h, w) at training timesteps t (B,) or ()."""

    @register_to_config
    def __init__(self, labels: dict[str, list[str]], in_channels: int = 4, sample_size: int = 8,
                 block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1, norm_num_groups: int = 8):
        super().__init__()
        width = block_out_channels[0]
        time_width = width * TIME_EMBED_FACTOR
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, time_width)
        self.conv_in = torch.nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        channels = [width, *block_out_channels]
        self.down_blocks = torch.nn.ModuleList(
            DownBlock2D(channels[i], channels[i + 1], time_width, num_layers=layers_per_block, resnet_eps=NORM_EPS,
                        resnet_act_fn="silu", resnet_groups=norm_num_groups,
                        add_downsample=i < len(block_out_channels) - 1, downsample_padding=1)
            for i in range(len(block_out_channels)))
        self.norm_out = torch.nn.GroupNorm(norm_num_groups, block_out_channels[-1], eps=NORM_EPS)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(block_out_channels[-1], len(words))
                                          for name, words in labels.items()})

    @property
    def label_names(self) -> list[str]:
        return list(self.config.labels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> dict[str, torch.Tensor]:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        embedding = self.time_embedding(self.time_proj(timestep).to(self.dtype))  # (B, 4W)
        h = self.conv_in(sample.to(self.dtype))  # (B, W, h, w)
        for block in self.down_blocks:
            h, _ = block(h, embedding)  # (B, C_i, h / 2^i, w / 2^i)
        pooled = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, C)
        return {name: head(pooled) for name, head in self.heads.items()}


def build_classifier(config, labels: dict[str, list[str]], latent_channels: int,
                     latent_size: int) -> NoisyLatentClassifier:
    """A classifier of `config`'s sizes (t2i.config.ClassifierConfig) for `labels`' vocabularies."""
    return NoisyLatentClassifier({name: list(words) for name, words in labels.items()}, latent_channels, latent_size,
                                 tuple(config.block_out_channels), config.layers_per_block, config.norm_num_groups)
