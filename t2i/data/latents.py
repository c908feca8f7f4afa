"""Latent caching: encode a dataset once with the frozen VAE, so the U-Net stage never runs the encoder.

With a cache folder the encoded moments are kept on disk between runs, under a key of everything that decides
them: the VAE's weights and dtype, and the data (its images or files, captions, resolution, crop, flip and
buckets). A changed model, image or setting gives another key, so a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from t2i.atomic import write_file
from t2i.data.image_captions import ImageCaptionDataset
from t2i.data.shapes import ShapesDataset
from t2i.errors import T2IError


class LatentDataset(Dataset):
    """Posterior moments (mean, std) of every image, with its caption; latents are sampled per step.

    Images of one size have their moments stacked in `mean` and `std`. Aspect-ratio buckets (`shapes`: each item's
    (height, width) in pixels, as `ImageCaptionDataset.shapes`) give lists of per-item moments instead, and the
    batch sampler draws every batch from one bucket, as it does from the images. An item may be asked for as `i` or
    as `(i, epoch)`, as the samplers of images pass it."""

    def __init__(self, mean: torch.Tensor | list[torch.Tensor], std: torch.Tensor | list[torch.Tensor],
                 captions: list[str], shapes: list[tuple[int, int]] | None = None):
        self.mean, self.std, self.captions, self.shapes = mean, std, captions, shapes

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i = int(key[0] if isinstance(key, tuple) else key)
        return {"latent_mean": self.mean[i], "latent_std": self.std[i], "caption": self.captions[i]}


@torch.no_grad()
def _encode(vae: AutoencoderKL, dataset: Dataset, batch_size: int, desc: str) -> LatentDataset:
    means, stds, captions = [], [], []
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc):
        posterior = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        captions.extend(batch["caption"])
    return LatentDataset(torch.cat(means), torch.cat(stds), captions)


def encode_dataset(vae: AutoencoderKL, dataset: Dataset, batch_size: int = 256) -> LatentDataset:
    """Every item's posterior moments; a bucketed dataset's (one with `shapes`) are encoded a bucket at a time."""
    shapes = getattr(dataset, "shapes", None)
    if shapes is None:
        return _encode(vae, dataset, batch_size, "caching latents")
    means: list[torch.Tensor] = [torch.empty(0)] * len(shapes)
    stds, captions = list(means), [""] * len(shapes)
    for height, width in sorted(set(shapes)):
        members = [i for i, shape in enumerate(shapes) if shape == (height, width)]
        bucket = _encode(vae, Subset(dataset, members), batch_size, f"caching latents ({height}x{width})")
        for j, i in enumerate(members):
            means[i], stds[i], captions[i] = bucket.mean[j], bucket.std[j], bucket.captions[j]
    return LatentDataset(means, stds, captions, list(shapes))


def cached_latents(vae: AutoencoderKL, dataset: Dataset, cache_dir: Path | None) -> LatentDataset:
    """`encode_dataset`, read from and written to `cache_dir` under its key (in memory only when None)."""
    if cache_dir is None:
        return encode_dataset(vae, dataset)
    key = cache_key(vae, dataset)
    path = Path(cache_dir) / f"latents-{key[:32]}.safetensors"
    if path.is_file():
        try:
            latents = _read_latents(path, key)
            if latents is not None:
                print(f"latents read from the cache: {path}")
                return latents
        except (OSError, SafetensorError, ValueError, KeyError, TypeError):
            print(f"latent cache {path} is unreadable; encoding again")
    latents = encode_dataset(vae, dataset)
    with writing_cache(path) as draft:
        _write_latents(latents, key, draft)
    return latents


@contextmanager
def writing_cache(path: Path) -> Iterator[Path]:
    """A draft of the cache file `path`, swapped in complete (a reader never sees half a cache); a folder or disk
    that cannot take it stops the run with one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with write_file(path) as draft:
            yield draft
    except OSError as error:
        raise T2IError(f"cannot write the cache file '{path}' ({error.strerror or error}): set latent_cache_dir to a "
                       "writable folder with free space, or leave it unset to keep the caches in memory") from None


def _write_latents(latents: LatentDataset, key: str, path: Path) -> None:
    """Stacked moments as `mean` and `std`; bucketed ones item by item (`mean.0`, `std.0`, ...), with their shapes.
    The captions (and shapes) ride in the safetensors header."""
    metadata = {"key": key, "captions": json.dumps(latents.captions)}
    if latents.shapes is None:
        tensors = {"mean": latents.mean.contiguous(), "std": latents.std.contiguous()}
    else:
        metadata["shapes"] = json.dumps(latents.shapes)
        tensors = {f"{name}.{i}": moment.contiguous() for name, moments in (("mean", latents.mean), ("std", latents.std))
                   for i, moment in enumerate(moments)}
    save_file(tensors, path, metadata=metadata)


def _read_latents(path: Path, key: str) -> LatentDataset | None:
    """The latents written under `key` at `path`, or None when the file holds another key's."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    if header["key"] != key:
        return None
    tensors, captions = load_file(path), json.loads(header["captions"])
    if "shapes" not in header:
        return LatentDataset(tensors["mean"], tensors["std"], captions)
    shapes = [tuple(shape) for shape in json.loads(header["shapes"])]
    return LatentDataset([tensors[f"mean.{i}"] for i in range(len(shapes))],
                         [tensors[f"std.{i}"] for i in range(len(shapes))], captions, shapes)


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
