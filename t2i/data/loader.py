"""Resumable training batches for any dataset `build_datasets` makes: the one call the training loop needs.

    batches = train_batches(dataset, batch_size, seed, start_batch=state.micro_batches,
                            rank=accelerator.process_index, world_size=accelerator.num_processes)

Invariant, for every kind: micro-batch k of a process is a pure function of (seed, k, rank, world_size) and the
data, so a run resumed at k sees exactly the batches an uninterrupted one sees. Square images use
`ResumableBatchSampler`, aspect-ratio buckets `BucketBatchSampler`, tar shards the stream's own batching.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from t2i.data.buckets import BucketBatchSampler
from t2i.data.image_captions import ImageCaptionDataset
from t2i.data.sampler import ResumableBatchSampler
from t2i.data.sources.webdataset import ShardStream


class EpochKeyedBatchSampler(Sampler[list[tuple[int, int]]]):
    """`ResumableBatchSampler`'s batches, each index paired with its epoch, so that an `ImageCaptionDataset`
    draws fresh crops and flips every epoch."""

    def __init__(self, batches: ResumableBatchSampler):
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for k, batch in enumerate(self.batches, start=self.batches.start_batch):
            epoch = k // self.batches.batches_per_epoch
            yield [(index, epoch) for index in batch]

    def __len__(self) -> int:
        return len(self.batches)


def batch_sampler(dataset: Dataset, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                  world_size: int = 1) -> Sampler:
    """The resumable batch sampler that suits a map-style dataset."""
    if isinstance(dataset, ImageCaptionDataset) and dataset.shapes is not None:
        shapes = sorted(set(dataset.shapes))
        buckets = [shapes.index(shape) for shape in dataset.shapes]
        return BucketBatchSampler(buckets, batch_size, seed, start_batch, rank, world_size)
    batches = ResumableBatchSampler(len(dataset), batch_size, seed, start_batch, rank, world_size)
    return EpochKeyedBatchSampler(batches) if isinstance(dataset, ImageCaptionDataset) else batches


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on `device` (captions and other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_batches(dataset: Dataset, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                  world_size: int = 1) -> Iterator[dict]:
    """Endless collated micro-batches of this process, from micro-batch `start_batch` on."""
    if isinstance(dataset, ShardStream):
        return dataset.batches(batch_size, seed, start_batch, rank, world_size)
    sampler = batch_sampler(dataset, batch_size, seed, start_batch, rank, world_size)
    return iter(DataLoader(dataset, batch_sampler=sampler))
