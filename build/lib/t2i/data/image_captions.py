"""The map-style dataset of checked user images: item i is sample i resized, cropped and flipped.

An item can be asked for as `i` or as `(i, epoch)`. Samplers here pass `(i, epoch)`, so that random crops and
flips change from epoch to epoch while staying a pure function of (seed, epoch, i): resume stays exact.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from t2i.data.scan import Sample, load_rgb
from t2i.data.transforms import Crop, resize_crop_flip, sample_generator, to_tensor


class ImageCaptionDataset(Dataset):
    """Item: {"pixel_values": float32 (3, H, W) in [-1, 1], "caption": str, "index": i}.

    Every item is `resolution` square, unless `shapes` gives each sample its own (height, width) bucket.
    """

    def __init__(self, samples: list[Sample], resolution: int, crop: Crop = "center", random_flip: bool = False,
                 seed: int = 0, shapes: list[tuple[int, int]] | None = None):
        if shapes is not None and len(shapes) != len(samples):
            raise ValueError(f"{len(shapes)} bucket shapes for {len(samples)} samples")
        self.samples, self.resolution, self.crop = samples, resolution, crop
        self.random_flip, self.seed, self.shapes = random_flip, seed, shapes

    def __len__(self) -> int:
        return len(self.samples)

    def shape(self, index: int) -> tuple[int, int]:
        """(height, width) of item `index`."""
        return self.shapes[index] if self.shapes is not None else (self.resolution, self.resolution)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        sample = self.samples[index]
        height, width = self.shape(index)
        image = resize_crop_flip(load_rgb(sample.image), height, width, self.crop, self.random_flip,
                                 sample_generator(self.seed, int(epoch), index))
        pixels: torch.Tensor = to_tensor(image)
        return {"pixel_values": pixels, "caption": sample.caption, "index": index}
