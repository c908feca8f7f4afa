"""One (image, caption) pair as a source lists it, before any check."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from t2i.data.quarantine import Rejected

# A file on disk, the encoded bytes themselves, or a reader of them (a row of a `datasets` table).
ImageSource = Path | bytes | Callable[[], bytes | Path]


@dataclass(frozen=True)
class Entry:
    """`name` is how the quarantine names it: a path relative to the root, "shard.tar:key" or "train[12]".

    `problem` is set when the source already knows the entry is bad (a path that escapes the root, a caption
    file that is not UTF-8): the scan then quarantines it without reading the image.
    """

    name: str
    image: ImageSource | None
    caption: str | None
    problem: Rejected | None = None


def read_image_source(image: ImageSource) -> Path | bytes:
    return image() if callable(image) else image
