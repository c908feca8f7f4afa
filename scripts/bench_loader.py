"""How fast training batches of user images come: with 0, 1, ... worker processes decoding an image folder, or
with and without the reading thread of streamed tar shards; alone, or beside a training step.

    python scripts/bench_loader.py IMAGE_FOLDER --resolution 512 --batch 16 --workers 0 1 2
    python scripts/bench_loader.py SHARD_FOLDER --resolution 512 --batch 16 --workers 0 1 --step-ms 180
    python scripts/bench_loader.py --synthetic 200 [--shards] --workers 0 2 4 --step-ms 180   # any machine

IMAGE_FOLDER is any folder `t2i finetune --data` takes; a folder of `.tar` shards is streamed as webdataset.
`--synthetic N` writes N photo-sized JPEGs (600-1,200 px, smooth random colour fields with noise, quality 90) to a
temporary folder, or to four shards with `--shards`, for machines without user images.
Images are cropped at random and flipped, as a fine-tune with `data.crop=random` sees them, so nothing can be
cached. `--step-ms` stands for a GPU step between batches: the host waits that long without holding a core or
Python's lock (a sleep), as it waits for the device; overlapped loading costs a step no more than that.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from t2i.config import DataConfig
from t2i.data.build import build_datasets
from t2i.data.loader import train_batches


def synthetic_images(folder: Path, count: int, shards: bool) -> Path:
    """`count` JPEGs written to `folder` (an image folder with metadata.jsonl, or four webdataset shards)."""
    rng = np.random.default_rng(0)
    encoded = []
    for i in range(count):
        width, height = (int(side) for side in rng.integers(600, 1201, size=2))
        coarse = rng.uniform(0, 255, size=(height // 64 + 2, width // 64 + 2, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-12, 13, size=field.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append((f"{i:05d}", buffer.getvalue(), f"a synthetic photo number {i}"))
    if not shards:
        for key, data, _ in encoded:
            (folder / f"{key}.jpg").write_bytes(data)
        rows = [json.dumps({"file_name": f"{key}.jpg", "text": caption}) for key, _, caption in encoded]
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
        return folder
    for shard in range(4):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for key, data, caption in encoded[shard::4]:
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode())):
                    member = tarfile.TarInfo(name)
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", help="an image folder or a folder of .tar shards")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="N generated JPEGs instead of FOLDER")
    parser.add_argument("--shards", action="store_true", help="--synthetic: as webdataset shards")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker processes (for shards threads; 0: in line)")
    parser.add_argument("--step-ms", type=float, default=0.0, help="a simulated device step before each batch")
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.synthetic == 0):
        parser.error("give an image folder or --synthetic N")
    if args.synthetic:
        temporary = tempfile.TemporaryDirectory(prefix="t2i-bench-loader-")
        args.folder = synthetic_images(Path(temporary.name), args.synthetic, args.shards)
    kind = "webdataset" if any(args.folder.glob("*.tar")) else "imagefolder"
    train, _, _ = build_datasets(DataConfig(dataset=kind, path=str(args.folder), resolution=args.resolution,
                                            crop="random", random_flip=True, shuffle_buffer=64), main_process=False)
    print(f"{args.folder} ({kind}), {args.resolution} px, batch {args.batch}, step {args.step_ms:.0f} ms")
    for workers in args.workers:
        batches = train_batches(train, args.batch, seed=0, workers=workers)
        next(batches)  # workers started and their queues primed
        started = time.perf_counter()
        for _ in islice(batches, args.batches):
            time.sleep(args.step_ms / 1e3)
        seconds = time.perf_counter() - started
        print(f"workers {workers}: {seconds / args.batches * 1e3:.0f} ms per step, "
              f"{args.batch * args.batches / seconds:.0f} images/s")
        del batches  # shuts its workers down before the next count starts its own


if __name__ == "__main__":
    main()
