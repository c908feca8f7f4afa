"""How fast training batches of user images come: with 0, 1, ... worker processes decoding an image folder, or
with and without the reading thread of streamed tar shards; alone, or beside a training step.

    python scripts/bench_loader.py IMAGE_FOLDER --resolution 512 --batch 16 --workers 0 1 2
    python scripts/bench_loader.py SHARD_FOLDER --resolution 512 --batch 16 --workers 0 1 --step-ms 180

IMAGE_FOLDER is any folder `t2i finetune --data` takes; a folder of `.tar` shards is streamed as webdataset.
Images are cropped at random and flipped, as a fine-tune with `data.crop=random` sees them, so nothing can be
cached. `--step-ms` stands for a GPU step between batches: the host waits that long without holding a core or
Python's lock (a sleep), as it waits for the device; overlapped loading costs a step no more than that.
"""
from __future__ import annotations

import argparse
import time
from itertools import islice
from pathlib import Path

from t2i.config import DataConfig
from t2i.data.build import build_datasets
from t2i.data.loader import train_batches


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker processes (shards: 0 reads in line, any other number in one thread)")
    parser.add_argument("--step-ms", type=float, default=0.0, help="a simulated device step before each batch")
    args = parser.parse_args(argv)
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
