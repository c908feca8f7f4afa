"""Decoding user images, and their deterministic conversion to 8-bit RGB.

`decode_image` fully loads an image (so truncation shows at scan time, not mid-run) and turns every way it can
fail into a `Rejected` with a quarantine reason. PIL's decompression-bomb limit stays on: an image over
`Image.MAX_IMAGE_PIXELS` is rejected, never opened.

`to_rgb8` converts any PIL mode to 8-bit RGB, the same way every time:
- EXIF orientation is applied first;
- transparency (RGBA, LA, PA, P or L with a transparent colour) is composited on white;
- CMYK, YCbCr, LAB, HSV, 1-bit and L go through PIL's own conversion;
- 16-bit modes (I;16*) are scaled by 255/65535 (division by 257), not clipped;
- 32-bit integers (I) are read as 16-bit when they fit in [0, 65535] (how PIL opens some 16-bit files), else
  scaled from their own min..max; floats (F) are read as [0, 1] when they lie there, else from min..max.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from t2i.data.quarantine import (
    DECOMPRESSION_BOMB,
    NOT_AN_IMAGE,
    TRUNCATED,
    UNREADABLE,
    ZERO_BYTE,
    Rejected,
)

WHITE = 255
_SIXTEEN_BIT_MAX = 65535
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def decode_image(source: Path | bytes) -> Image.Image:
    """Open and fully load an image from a path or bytes; raise `Rejected` with the reason it is bad."""
    data = source.read_bytes() if isinstance(source, Path) else source
    if len(data) == 0:
        raise Rejected(ZERO_BYTE)
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that PIL only warns; a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Rejected(DECOMPRESSION_BOMB, str(error)) from None
    except UnidentifiedImageError:
        raise Rejected(NOT_AN_IMAGE) from None
    except (OSError, EOFError, SyntaxError, ValueError) as error:
        truncated = isinstance(error, EOFError) or "truncat" in str(error).lower()
        raise Rejected(TRUNCATED if truncated else UNREADABLE, str(error)) from None
    return image


def to_rgb8(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, by the rules in the module docstring."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "L") and "transparency" in image.info:
        return _on_white(image.convert("RGBA"))
    if mode == "P":
        return image.convert("RGB")
    if mode in _ALPHA_MODES:
        return _on_white(image.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(np.asarray(image).astype(np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.min() >= 0 and values.max() <= _SIXTEEN_BIT_MAX:
            return _grey_to_rgb(values / 257.0)
        return _grey_to_rgb(_stretch(values))
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.min() >= 0.0 and values.max() <= 1.0:
            return _grey_to_rgb(values * 255.0)
        return _grey_to_rgb(_stretch(values))
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, L, 1


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite on white with exact integer rounding: out = (c·a + 255·(255 − a)) / 255."""
    pixels = np.asarray(rgba).astype(np.uint32)
    colour, alpha = pixels[..., :3], pixels[..., 3:]
    out = (colour * alpha + WHITE * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return np.zeros_like(values) if high == low else (values - low) * (255.0 / (high - low))


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
