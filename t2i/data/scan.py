"""The up-front check of a map-style source: every entry read once, bad ones quarantined, good ones kept.

Deterministic: the result depends only on the listing (sorted by the source) and the files, never on the
process, so every rank of a multi-process run keeps and skips the same entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from t2i.data.images import decode_image, to_rgb8
from t2i.data.quarantine import (
    CAPTION_TOO_LONG,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_FILE,
    MISSING_IMAGE,
    NOT_A_FILE,
    TOO_SMALL,
    UNREADABLE,
    Quarantine,
    Rejected,
)
from t2i.data.sources.entry import Entry, ImageSource, read_image_source


@dataclass(frozen=True)
class Sample:
    """A checked entry: its image can be decoded and is at least the minimum size; its caption is clean."""

    name: str
    image: ImageSource
    caption: str
    width: int  # after EXIF orientation
    height: int


def check_caption(caption: str | None, max_length: int) -> str:
    """The caption, stripped; `Rejected` when missing, blank or longer than `max_length` characters."""
    if caption is None:
        raise Rejected(MISSING_CAPTION)
    caption = caption.strip()
    if not caption:
        raise Rejected(EMPTY_CAPTION)
    if len(caption) > max_length:
        raise Rejected(CAPTION_TOO_LONG, f"{len(caption)} characters, more than {max_length}")
    return caption


def load_rgb(image: ImageSource) -> Image.Image:
    """Decode and convert to 8-bit RGB; `Rejected` with the reason when the image is bad."""
    try:
        data = read_image_source(image)
        if isinstance(data, Path):
            if not data.exists():  # named in full: a table's row names it only by its number
                raise Rejected(MISSING_FILE, f"no file '{data}'")
            if not data.is_file():
                raise Rejected(NOT_A_FILE, f"'{data}' is not a file")
            data = data.read_bytes()
    except OSError as error:  # no permission, an I/O error, a file gone from a table's cache
        raise Rejected(UNREADABLE, str(error)) from None
    return to_rgb8(decode_image(data))


def check_image(image: ImageSource | None, min_side: int) -> Image.Image:
    if image is None:
        raise Rejected(MISSING_IMAGE)
    rgb = load_rgb(image)
    if min(rgb.size) < min_side:
        raise Rejected(TOO_SMALL, f"{rgb.width}x{rgb.height}, shorter side below {min_side}")
    return rgb


def check_entry(entry: Entry, min_side: int, max_caption_length: int) -> tuple[Sample, Image.Image]:
    """The checked sample and its RGB image, or `Rejected` naming the first thing wrong with the entry."""
    if entry.problem is not None:
        raise entry.problem
    caption = check_caption(entry.caption, max_caption_length)
    rgb = check_image(entry.image, min_side)
    return Sample(entry.name, entry.image, caption, rgb.width, rgb.height), rgb


def scan(entries: list[Entry], min_side: int, max_caption_length: int, quarantine: Quarantine) -> list[Sample]:
    """The good entries, in listing order; every bad one goes to `quarantine` with its reason."""
    samples = []
    for entry in entries:
        try:
            sample, _ = check_entry(entry, min_side, max_caption_length)
        except Rejected as rejected:
            quarantine.add(entry.name, rejected.reason, rejected.detail)
            continue
        samples.append(sample)
    return samples
