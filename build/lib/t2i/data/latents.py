"""Latent caching: encode a dataset once with the frozen VAE, so the U-Net stage never runs the encoder."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


class LatentDataset(Dataset):
    """Posterior moments (mean, std) of every image, with its caption; latents are sampled per step."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str]):
        self.mean, self.std, self.captions = mean, std, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"latent_mean": self.mean[i], "latent_std": self.std[i], "caption": self.captions[i]}


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, dataset: Dataset, batch_size: int = 256) -> LatentDataset:
    means, stds, captions = [], [], []
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc="caching latents"):
        posterior = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        captions.extend(batch["caption"])
    return LatentDataset(torch.cat(means), torch.cat(stds), captions)
