"""Stage vae: train the AutoencoderKL on images (reconstruction + a small KL term), then measure its latent
scaling factor and export it in diffusers format."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.utils.data import Dataset

from t2i.config import VAEConfig
from t2i.eval.grid import save_grid
from t2i.models.vae import measure_scaling_factor
from t2i.training.randomness import BatchRandomness

SCALING_SAMPLE_SIZE = 2048  # images used to measure the latent standard deviation
PREVIEW_IMAGES = 8


class VAEStage:
    name = "vae"

    def __init__(self, vae: AutoencoderKL, config: VAEConfig, dataset: Dataset):
        self.model = vae
        self.config = config
        self.dataset = dataset

    def loss(self, model: AutoencoderKL, batch: dict, rng: BatchRandomness) -> tuple[torch.Tensor, dict]:
        images = batch["pixel_values"]
        posterior = model.encode(images).latent_dist
        noise = rng.randn(posterior.mean.shape, dtype=images.dtype, device=images.device)
        reconstruction = model.decode(posterior.mean + posterior.std * noise).sample
        mse = F.mse_loss(reconstruction.float(), images.float())
        l1 = F.l1_loss(reconstruction.float(), images.float())
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + self.config.l1_weight * l1 + self.config.kl_weight * kl
        return loss, {"mse": mse.item(), "kl": kl.item()}

    def _preview_images(self, count: int) -> torch.Tensor:
        return torch.stack([self.dataset[i]["pixel_values"] for i in range(min(count, len(self.dataset)))])

    @torch.no_grad()
    def sample(self, model: AutoencoderKL, path: Path) -> None:
        """Originals above their reconstructions."""
        model.eval()
        images = self._preview_images(PREVIEW_IMAGES).to(model.device, model.dtype)
        reconstruction = model.decode(model.encode(images).latent_dist.mean).sample
        save_grid(torch.cat([images, reconstruction]), path, rows=2, row_labels=["original", "reconstructed"])

    def save(self, model: AutoencoderKL, folder: Path) -> None:
        images = self._preview_images(SCALING_SAMPLE_SIZE)
        model.register_to_config(scaling_factor=measure_scaling_factor(model, images))
        model.save_pretrained(folder)
