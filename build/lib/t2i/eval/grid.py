"""Image grids for sample previews and reports."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) tensors in [-1, 1] -> PIL images."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def make_grid(images: list[Image.Image], rows: int | None = None, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile images (all one size) in `rows` rows on a white canvas; `scale` enlarges them (nearest)."""
    rows = rows or max(1, int(math.sqrt(len(images))))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    w, h = w * scale, h * scale
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(image.resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def save_grid(images: torch.Tensor | list[Image.Image], path: Path, rows: int | None = None, scale: int = 2) -> Path:
    if isinstance(images, torch.Tensor):
        images = to_pil(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, rows=rows, scale=scale).save(path)
    return path
