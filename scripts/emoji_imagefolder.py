"""Turn the npm package `emoji-datasource-google` into an image folder that `t2i finetune --data` reads.

    npm pack emoji-datasource-google@16.0.0 && mkdir emoji && tar xzf emoji-datasource-google-16.0.0.tgz -C emoji
    python scripts/emoji_imagefolder.py emoji/package /tmp/emoji-data [--size 64]

The Noto emoji (Apache 2.0): every image in img/google/SIZE/ that emoji.json names, captioned from its name
("an emoji of grinning face", "... thumbs up sign, medium skin tone"), listed in metadata.jsonl as
{"file_name", "text"}. Images are copied as they are (RGBA; t2i composites transparency on white).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}


def skin_tone_words(code: str) -> str:
    tones = [SKIN_TONES.get(part, part.lower()) for part in code.split("-")]
    return f"{' and '.join(dict.fromkeys(tones))} skin tone"


def captioned_images(package: Path) -> list[tuple[str, str]]:
    """(image file name, caption) for every emoji (and skin-tone variant) with a Google image."""
    entries = []
    for emoji in json.loads((package / "emoji.json").read_text()):
        name = (emoji.get("name") or emoji["short_name"].replace("_", " ")).lower()
        if emoji.get("has_img_google"):
            entries.append((emoji["image"], f"an emoji of {name}"))
        for code, variation in (emoji.get("skin_variations") or {}).items():
            if variation.get("has_img_google"):
                entries.append((variation["image"], f"an emoji of {name}, {skin_tone_words(code)}"))
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="the unpacked npm package (the folder holding emoji.json)")
    parser.add_argument("out", type=Path, help="the image folder to write")
    parser.add_argument("--size", type=int, default=64, choices=(16, 20, 32, 64), help="image size (default: 64)")
    args = parser.parse_args()
    source = args.package / "img" / "google" / str(args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, missing = [], 0
    for file_name, caption in captioned_images(args.package):
        if not (source / file_name).is_file():
            missing += 1
            continue
        shutil.copyfile(source / file_name, args.out / file_name)
        rows.append({"file_name": file_name, "text": caption})
    (args.out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} images with captions in {args.out} ({missing} listed without an image file)")


if __name__ == "__main__":
    main()
