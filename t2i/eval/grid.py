"""Image grids for sample previews and reports.

Grids are for people: a caption under each image (its prompt) and a name beside each row say what is where. The
judge and the evaluation read the images themselves, never a grid, so labels change nothing that is measured.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

MAX_LABEL_LINES = 4  # a longer caption is cut, with an ellipsis
LABEL_GAP = 5  # pixels between the captions of neighbouring images
TEXT = (0, 0, 0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) tensors in [-1, 1] -> PIL images."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def wrap(text: str, font: ImageFont.ImageFont, width: int, max_lines: int = MAX_LABEL_LINES) -> list[str]:
    """`text` in lines at most `width` pixels wide, broken between words (a word wider than that gets a line of its
    own); at most `max_lines`, the last ending in an ellipsis when text was left out."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + "..."
    return lines


def make_grid(images: list[Image.Image], rows: int | None = None, scale: int = 1, pad: int = 2,
              labels: list[str] | None = None, row_labels: list[str] | None = None) -> Image.Image:
    """Tile images (all one size) in `rows` rows on a white canvas; `scale` enlarges them (nearest).

    `labels`: one caption per image, written under it; `row_labels`: one name per row, written to its left. The
    images are pasted unchanged either way."""
    rows = rows or max(1, int(math.sqrt(len(images))))
    cols = math.ceil(len(images) / rows)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    w, h = images[0].size
    w, h = w * scale, h * scale
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    wrapped = [wrap(label, font, w - LABEL_GAP) for label in labels] if labels is not None else []
    caption = max((len(lines) for lines in wrapped), default=0) * line_height
    left = max((math.ceil(font.getlength(name)) for name in row_labels), default=0) + 2 * pad if row_labels else 0
    cell_h = h + caption
    canvas = Image.new("RGB", (left + cols * (w + pad) + pad, rows * (cell_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        x, y = left + pad + c * (w + pad), pad + r * (cell_h + pad)
        canvas.paste(image.resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + h + j * line_height), line, fill=TEXT, font=font)
    for r, name in enumerate(row_labels or []):
        draw.text((pad, pad + r * (cell_h + pad) + (h - line_height) // 2), name, fill=TEXT, font=font)
    return canvas


def save_grid(images: torch.Tensor | list[Image.Image], path: Path, rows: int | None = None, scale: int = 2,
              labels: list[str] | None = None, row_labels: list[str] | None = None) -> Path:
    if isinstance(images, torch.Tensor):
        images = to_pil(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, rows=rows, scale=scale, labels=labels, row_labels=row_labels).save(path)
    return path
