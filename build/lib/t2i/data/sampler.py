"""Endless, resumable shuffled batches: batch k is a pure function of (seed, k), so resuming is exact."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from t2i.errors import T2IError


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields index batches forever, epoch after epoch, each epoch a fresh permutation seeded by (seed, epoch).

    With several processes, every global batch of `batch_size * world_size` indices is split between them.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if dataset_size < global_batch:
            raise T2IError(f"the dataset has {dataset_size} examples, fewer than one batch of {global_batch}; "
                           "lower the batch size or add data")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.batches_per_epoch = dataset_size // global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = divmod(self.start_batch, self.batches_per_epoch)
        global_batch = self.batch_size * self.world_size
        while True:
            permutation = self._permutation(epoch)
            for k in range(position, self.batches_per_epoch):
                chunk = permutation[k * global_batch:(k + 1) * global_batch]
                yield chunk[self.rank::self.world_size].tolist()
            epoch, position = epoch + 1, 0

    def __len__(self) -> int:
        return 2**62  # endless; the training loop counts steps
