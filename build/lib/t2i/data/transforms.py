"""Resize, crop and flip, with randomness drawn from a generator seeded by (seed, epoch, index).

Never the global RNG: the crop and flip of sample i in epoch e are a pure function of (seed, e, i), so a
resumed run sees exactly the pixels an uninterrupted one would.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

Crop = Literal["center", "random"]


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample's augmentation; SeedSequence keeps nearby (seed, epoch, index) apart."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def resize_to_cover(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale, keeping the aspect ratio, to the smallest size that covers height x width."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size == image.size:
        return image
    # Lanczos keeps detail when shrinking; bicubic rings less when enlarging.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, resample)


def resize_crop_flip(image: Image.Image, height: int, width: int, crop: Crop, random_flip: bool,
                     generator: torch.Generator) -> Image.Image:
    """Cover height x width, crop to it (centred, or at a random offset), and maybe flip left-right."""
    image = resize_to_cover(image, height, width)
    spare_x, spare_y = image.width - width, image.height - height
    # Both draws are made whatever the options, so that turning one on never shifts the other's numbers.
    offset_x = int(torch.randint(0, spare_x + 1, (), generator=generator))
    offset_y = int(torch.randint(0, spare_y + 1, (), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    if crop == "center":
        offset_x, offset_y = spare_x // 2, spare_y // 2
    image = image.crop((offset_x, offset_y, offset_x + width, offset_y + height))
    if random_flip and flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB to float32 (3, H, W) in [-1, 1], as the shapes dataset gives."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
