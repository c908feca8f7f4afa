"""Builders of tiny image folders for the data tests (and the fine-tune tests): good images, and one of every
kind of bad file the quarantine must catch, all made here with PIL; nothing is downloaded or committed."""
from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

GOOD_COUNT = 20
# Sizes the good images cycle through: square, wide, tall; all at least 32 on the short side.
GOOD_SIZES = ((40, 40), (64, 32), (32, 56), (48, 48), (80, 40))


@dataclass
class PlantedFolder:
    """`good` maps each good file name to its caption; `bad` maps each planted bad entry to its reason."""

    root: Path
    good: dict[str, str] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)


def image_bytes(size: tuple[int, int], seed: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A (width, height) image of smooth random colour, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 60, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
    pixels = ((base + ramp) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header claims width x height pixels (far over PIL's limit) but whose data is tiny."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def good_images(root: Path, count: int = GOOD_COUNT, prefix: str = "good") -> dict[str, str]:
    """Write `count` good images (PNG and JPEG, several aspect ratios) under root; return name -> caption."""
    written = {}
    for i in range(count):
        fmt, suffix = ("JPEG", "jpg") if i % 3 == 2 else ("PNG", "png")
        name = f"{prefix}_{i:03d}.{suffix}"
        (root / name).write_bytes(image_bytes(GOOD_SIZES[i % len(GOOD_SIZES)], seed=i, fmt=fmt))
        written[name] = f"a picture, number {i}"
    return written


def _write_bad_images(root: Path, outside: Path) -> dict[str, str]:
    """The bad image files both layouts share; `outside` is a good image outside the root."""
    png, jpeg = image_bytes((48, 48), 100), image_bytes((48, 48), 101, "JPEG")
    files = {
        "truncated.png": (png[: len(png) // 2], "truncated image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated image"),
        "zero.png": (b"", "zero-byte file"),
        "text.png": (b"this is not an image, only text named like one\n", "not an image"),
        "bomb.png": (bomb_png(), "decompression bomb"),
        "tiny.png": (image_bytes((8, 8), 102), "image too small"),
        "corrupt.png": (_corrupted(image_bytes((48, 48), 104)), "unreadable image"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    (root / "link_out.png").symlink_to(outside)
    (root / "linked_folder").symlink_to(outside.parent / "outside_folder")
    (root / "looped").mkdir()
    (root / "looped" / "back").symlink_to(root)  # a cycle, which the listing must not follow twice
    bad = {name: reason for name, (_, reason) in files.items()}
    bad["link_out.png"] = "escapes dataset root"
    return bad


def _corrupted(png: bytes) -> bytes:
    """A complete PNG whose compressed pixel data is scrambled."""
    data = bytearray(png)
    start = data.index(b"IDAT") + 8
    for i in range(start, start + 40):
        data[i] ^= 0x5A
    return bytes(data)


def planted_folder(base: Path, layout: Literal["metadata", "sidecar"] = "metadata") -> PlantedFolder:
    """A folder of GOOD_COUNT good images and one of every bad kind, captioned by metadata.jsonl or by
    sidecar .txt files. Bad captions are planted on good, readable images, so only the caption is wrong."""
    root, outside = base / f"{layout}_data", base / "outside.png"
    root.mkdir(parents=True)
    outside.write_bytes(image_bytes((48, 48), 103))
    (base / "outside_folder").mkdir()
    (base / "outside_folder" / "elsewhere.png").write_bytes(image_bytes((48, 48), 105))
    folder = PlantedFolder(root, good_images(root))
    folder.bad = _write_bad_images(root, outside)
    if layout == "sidecar":
        folder.bad["linked_folder/"] = "escapes dataset root"
    captions: dict[str, str | bytes | None] = {**folder.good, **{name: "a bad file" for name in folder.bad}}
    bad_captions = {"no_caption.png": (None, "missing caption"), "blank_caption.png": ("  \n", "empty caption"),
                    "long_caption.png": ("word " * 300, "caption too long")}
    if layout == "sidecar":
        bad_captions["latin1_caption.png"] = ("café".encode("latin-1"), "caption not UTF-8")
    for i, (name, (caption, reason)) in enumerate(bad_captions.items()):
        (root / name).write_bytes(image_bytes((48, 48), 200 + i))
        captions[name] = caption
        folder.bad[name] = reason
    if layout == "sidecar":
        for name, caption in captions.items():
            if caption is not None and not name.endswith("/"):
                text = caption if isinstance(caption, bytes) else caption.encode("utf-8")
                (root / name).with_suffix(".txt").write_bytes(text)
        (root / "renamed.jpg.bak").write_bytes(image_bytes((48, 48), 106, "JPEG"))  # its caption pairs with nothing
        (root / "renamed.txt").write_text("a picture whose file was renamed")
        folder.bad["renamed.txt"] = "caption without image"
        return folder
    rows = [{"file_name": name, **({} if caption is None else {"text": caption})} for name, caption in captions.items()]
    rows += [{"file_name": "../outside.png", "text": "climbs out"}, {"file_name": str(outside), "text": "absolute"},
             {"file_name": "ghost.png", "text": "listed, never written"}]
    folder.bad.update({"../outside.png": "escapes dataset root", str(outside): "escapes dataset root",
                       "ghost.png": "missing file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def clean_folder(base: Path, count: int = GOOD_COUNT, metadata: Literal["jsonl", "csv", "sidecar"] = "jsonl",
                 caption_column: str = "text") -> PlantedFolder:
    """A folder of good images only, captioned as asked."""
    root = base / f"clean_{metadata}"
    root.mkdir(parents=True)
    folder = PlantedFolder(root, good_images(root, count))
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("".join(
            json.dumps({"file_name": name, caption_column: caption}) + "\n" for name, caption in folder.good.items()))
    elif metadata == "csv":
        lines = [f"file_name,{caption_column}"] + [f'{name},"{caption}"' for name, caption in folder.good.items()]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    else:
        for name, caption in folder.good.items():
            (root / name).with_suffix(".txt").write_text(caption)
    return folder


def write_shards(base: Path, count: int = 24, per_shard: int = 8, bad: bool = True) -> PlantedFolder:
    """Tar shards in the webdataset layout (key.png + key.txt); with `bad`, one shard also holds a truncated
    image, a sample without caption, a caption that is not UTF-8, and a non-image under an image name."""
    import tarfile

    root = base / "shards"
    root.mkdir(parents=True)
    folder = PlantedFolder(root)
    members: list[tuple[str, bytes]] = []
    for i in range(count):
        key = f"sample_{i:04d}"
        caption = f"a streamed picture, number {i}"
        members += [(f"{key}.png", image_bytes(GOOD_SIZES[i % len(GOOD_SIZES)], seed=i)),
                    (f"{key}.txt", caption.encode())]
    shard_names = [f"shard-{s:03d}.tar" for s in range(-(-count // per_shard))]
    for s, name in enumerate(shard_names):
        for key_index in range(s * per_shard, min(count, (s + 1) * per_shard)):
            folder.good[f"{name}:sample_{key_index:04d}"] = f"a streamed picture, number {key_index}"
    if bad:
        png = image_bytes((48, 48), 300)
        planted = [("bad_truncated", [("png", png[: len(png) // 2]), ("txt", b"half an image")], "truncated image"),
                   ("bad_uncaptioned", [("png", png)], "missing caption"),
                   ("bad_latin1", [("png", png), ("txt", "café".encode("latin-1"))], "caption not UTF-8"),
                   ("bad_text", [("jpg", b"not a jpeg"), ("txt", b"words")], "not an image")]
        for key, parts, reason in planted:
            members += [(f"{key}.{ext}", data) for ext, data in parts]
            folder.bad[f"{shard_names[-1]}:{key}"] = reason
    # Members are grouped per shard in order: good samples of shard s, and the bad ones in the last shard.
    for s, name in enumerate(shard_names):
        keys = {f"sample_{i:04d}" for i in range(s * per_shard, min(count, (s + 1) * per_shard))}
        with tarfile.open(root / name, "w") as tar:
            for member, data in members:
                key = member.split(".", 1)[0]
                if key in keys or (key.startswith("bad_") and s == len(shard_names) - 1):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder
