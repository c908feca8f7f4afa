"""Aspect-ratio buckets, as sd-scripts does them: a few (height, width) shapes of about resolution² pixels,
each image trained at the shape nearest its aspect ratio, and every batch drawn from one bucket.

Invariant (as `ResumableBatchSampler`): batch k is a pure function of (seed, k). Epoch e shuffles each
bucket and the order of all batches with a generator seeded by (seed, e); the number of batches per epoch
depends only on the bucket sizes, so batch k falls in a known epoch and resuming at k is exact.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from t2i.errors import T2IError


def bucket_shapes(resolution: int, step: int, max_aspect_ratio: float) -> list[tuple[int, int]]:
    """(height, width) pairs, sides multiples of `step`, area at most resolution², sorted by aspect ratio."""
    area = resolution * resolution
    shapes = {(resolution // step * step,) * 2}
    for width in range(step, int(resolution * math.sqrt(max_aspect_ratio)) + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect_ratio:
            shapes.update({(height, width), (width, height)})
    return sorted(shapes, key=lambda shape: (shape[1] / shape[0], shape))


def assign_buckets(sizes: list[tuple[int, int]], shapes: list[tuple[int, int]]) -> list[int]:
    """For each (width, height), the index of the shape whose aspect ratio is nearest (in log ratio)."""
    log_ratios = np.log([width / height for height, width in shapes])
    return [int(np.argmin(np.abs(log_ratios - math.log(width / height)))) for width, height in sizes]


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, forever, batches of (index, epoch) keys whose indices all share one bucket.

    Each epoch covers every index at least once: a bucket whose size is not a multiple of the global batch
    (`batch_size * world_size`) has its last batch filled with repeats from the same bucket, so every batch
    keeps its size. Every global batch is split between the processes as `ResumableBatchSampler` splits it.
    """

    def __init__(self, buckets: list[int], batch_size: int, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not buckets:
            raise T2IError("no images to batch")
        self.batch_size, self.seed, self.start_batch = batch_size, seed, start_batch
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.members = [np.flatnonzero(np.asarray(buckets) == b) for b in sorted(set(buckets))]
        self.batches_per_epoch = sum(math.ceil(len(m) / self.global_batch) for m in self.members)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of epoch `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        batches = []
        for members in self.members:
            shuffled = members[torch.randperm(len(members), generator=generator).numpy()]
            padded_size = math.ceil(len(members) / self.global_batch) * self.global_batch
            padded = np.resize(shuffled, padded_size)  # repeats from the start of the shuffled bucket
            batches.extend(padded[i:i + self.global_batch].tolist() for i in range(0, padded_size, self.global_batch))
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, position = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            for batch in self.epoch_batches(epoch)[position:]:
                yield [(index, epoch) for index in batch[self.rank::self.world_size]]
            epoch, position = epoch + 1, 0

    def __len__(self) -> int:
        return 2**62  # endless; the training loop counts steps
