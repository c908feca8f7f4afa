"""Resumable training batches for any dataset `build_datasets` makes: the one call the training loop needs.

    batches = train_batches(dataset, batch_size, seed, start_batch=state.micro_batches,
                            rank=accelerator.process_index, world_size=accelerator.num_processes)

Invariant, for every kind: micro-batch k of a process is a pure function of (seed, k, rank, world_size) and the
data, so a run resumed at k sees exactly the batches an uninterrupted one sees. Square images use
`ResumableBatchSampler`, aspect-ratio buckets `BucketBatchSampler`, tar shards the stream's own batching.

Images read from disk are loaded by worker processes ahead of the step, off its critical path; batch k is the
same with any number of workers (augmentation is seeded by (seed, epoch, index), not by the process). Streamed
shards are read in one sequence, so there a thread of this process makes the next batches ahead, and the workers
are threads that decode and transform their images.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from t2i.data.buckets import BucketBatchSampler
from t2i.data.image_captions import ImageCaptionDataset
from t2i.data.latents import LatentDataset
from t2i.data.prefetch import prefetched
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
    """The resumable batch sampler that suits a map-style dataset: one bucket a batch where items have their own
    shapes (aspect-ratio buckets, as images or as their cached latents)."""
    if isinstance(dataset, (ImageCaptionDataset, LatentDataset)) and dataset.shapes is not None:
        shapes = sorted(set(dataset.shapes))
        buckets = [shapes.index(shape) for shape in dataset.shapes]
        return BucketBatchSampler(buckets, batch_size, seed, start_batch, rank, world_size)
    batches = ResumableBatchSampler(len(dataset), batch_size, seed, start_batch, rank, world_size)
    return EpochKeyedBatchSampler(batches) if isinstance(dataset, ImageCaptionDataset) else batches


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on `device` (captions and other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pinned(batch: dict) -> dict:
    """A collated batch with its tensors in page-locked memory, which copies to a GPU asynchronously."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# Workers for images read from disk: enough to decode a batch while a GPU step runs. Two cores stay with the
# training process (its Python thread and its kernels): on 2 cores a worker only took them from the step.
MAX_AUTO_WORKERS = 4
STREAM_BATCHES_AHEAD = 2  # batches a streamed-shard thread decodes ahead of the step


def _reads_images_from_disk(dataset: Dataset) -> bool:
    return isinstance(dataset, (ImageCaptionDataset, ShardStream))


def loader_workers(setting: int | None, dataset: Dataset) -> int:
    """Workers for `dataset`'s batches: `setting`, or for None none where items are already in memory (shapes,
    cached latents), and for images decoded from disk (image folders, streamed shards) the CPU's cores but two, at
    most MAX_AUTO_WORKERS. For shards the workers are threads (`train_batches`)."""
    if setting is not None:
        return setting
    if not _reads_images_from_disk(dataset):
        return 0
    return max(0, min(MAX_AUTO_WORKERS, (os.cpu_count() or 1) - 2))


def loading_note(dataset: Dataset, workers: int) -> str | None:
    """How the batches of images read from disk are loaded, for the run's log; None for data held in memory."""
    if not _reads_images_from_disk(dataset):
        return None
    if workers == 0:
        return "images are decoded in the training process, between steps (loader_workers: 0)"
    if isinstance(dataset, ShardStream) and workers == 1:
        how = f"a thread reads the shards {STREAM_BATCHES_AHEAD} batches ahead and decodes their images"
    elif isinstance(dataset, ShardStream):
        how = f"a thread reads the shards {STREAM_BATCHES_AHEAD} batches ahead, {workers} threads decode their images"
    else:
        how = f"{workers} worker process{'es' if workers > 1 else ''} decode images ahead of the step"
    return f"{how} (loader_workers: {workers})"


def _worker_in_its_own_process_group(_worker_id: int) -> None:
    """Ctrl-C and a `kill` of the process group reach every process in it. The training process stops gracefully
    after its step and then shuts its workers down; a worker killed first would be an error in it ("DataLoader
    worker is killed by signal"). So workers leave the group; they still exit when their parent asks or dies."""
    os.setpgrp()


def train_batches(dataset: Dataset, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                  world_size: int = 1, workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """Endless collated micro-batches of this process, from micro-batch `start_batch` on; `workers` processes
    prepare them ahead, in pinned memory for a fast copy to a GPU with `pin_memory`. Streamed shards are read in
    one sequence: there `workers` > 0 is a thread reading STREAM_BATCHES_AHEAD batches ahead, whose images that
    many threads decode and transform."""
    if isinstance(dataset, ShardStream):
        batches = dataset.batches(batch_size, seed, start_batch, rank, world_size, threads=workers)
        if pin_memory:
            batches = map(pinned, batches)
        return prefetched(batches, STREAM_BATCHES_AHEAD if workers else 0)
    sampler = batch_sampler(dataset, batch_size, seed, start_batch, rank, world_size)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                           worker_init_fn=_worker_in_its_own_process_group if workers else None))
