"""Latent caching: encode a dataset once with the frozen VAE, so the U-Net stage never runs the encoder.

With a cache folder the encoded moments are kept on disk between runs, under a key of everything that decides
them: the VAE's weights and dtype, and the data (its images or files, captions, resolution, crop, flip and
buckets). A changed model, image or setting gives another key, so a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from t2i.atomic import write_file
from t2i.data.image_captions import ImageCaptionDataset
from t2i.data.shapes import ShapesDataset


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


def cached_latents(vae: AutoencoderKL, dataset: Dataset, cache_dir: Path | None) -> LatentDataset:
    """`encode_dataset`, read from and written to `cache_dir` under its key (in memory only when None)."""
    if cache_dir is None:
        return encode_dataset(vae, dataset)
    key = cache_key(vae, dataset)
    path = Path(cache_dir) / f"latents-{key[:32]}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(path)
            with open(path, "rb") as f:  # the captions ride in the safetensors header
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
            if header["key"] == key:
                print(f"latents read from the cache: {path}")
                return LatentDataset(tensors["mean"], tensors["std"], json.loads(header["captions"]))
        except (OSError, SafetensorError, ValueError, KeyError):
            print(f"latent cache {path} is unreadable; encoding again")
    latents = encode_dataset(vae, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_file(path) as draft:  # complete or absent: a reader never sees half a cache
        save_file({"mean": latents.mean.contiguous(), "std": latents.std.contiguous()}, draft,
                  metadata={"key": key, "captions": json.dumps(latents.captions)})
    return latents


def cache_key(vae: AutoencoderKL, dataset: Dataset) -> str:
    digest = hashlib.sha256()
    digest.update(str(vae.dtype).encode())
    hash_weights(digest, vae)
    digest.update(data_fingerprint(dataset).encode())
    return digest.hexdigest()


def hash_weights(digest, module: torch.nn.Module) -> None:
    """Feed every named tensor of `module`, name and bytes, to `digest`."""
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def data_fingerprint(dataset: Dataset) -> str:
    """What decides the images and captions a dataset gives: its content, or its files and their settings."""
    digest = hashlib.sha256()
    if isinstance(dataset, ShapesDataset):
        digest.update(dataset.images.tobytes())
        digest.update(json.dumps(dataset.captions).encode())
        return "shapes:" + digest.hexdigest()
    if isinstance(dataset, ImageCaptionDataset):
        settings = [dataset.resolution, dataset.crop, dataset.random_flip, dataset.seed, dataset.shapes]
        digest.update(json.dumps(settings).encode())
        for sample in dataset.samples:
            digest.update(json.dumps([sample.name, sample.caption, _source_identity(sample.image)]).encode())
        return "images:" + digest.hexdigest()
    raise TypeError(f"no fingerprint for a {type(dataset).__name__}: its latents cannot be cached on disk")


def _source_identity(image) -> list:
    """A file by its path, size and modification time; a `datasets` row by its table's fingerprint."""
    if isinstance(image, Path):
        stat = image.stat()
        return [str(image.resolve()), stat.st_size, stat.st_mtime_ns]
    return [getattr(getattr(image, "table", None), "_fingerprint", repr(image)), getattr(image, "row", None)]
