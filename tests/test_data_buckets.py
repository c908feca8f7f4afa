"""Aspect-ratio buckets and resumable batches of user images: one shape per batch, every image each epoch,
and resume equal to an uninterrupted run."""
from collections import Counter
from itertools import islice

import pytest
import torch

from t2i.config import BucketConfig, DataConfig
from t2i.data.buckets import BucketBatchSampler, assign_buckets, bucket_shapes
from t2i.data.build import build_datasets
from t2i.data.loader import train_batches

from data_fixtures import clean_folder


def test_bucket_shapes_keep_the_area_and_the_step():
    shapes = bucket_shapes(32, 8, 2.0)
    assert (32, 32) in shapes and (24, 40) in shapes and (40, 24) in shapes
    for height, width in shapes:
        assert height % 8 == 0 and width % 8 == 0 and height * width <= 32 * 32
        assert max(height, width) / min(height, width) <= 2.0
    assert assign_buckets([(64, 32), (32, 64), (40, 40)], shapes) == [
        shapes.index((24, 40)), shapes.index((40, 24)), shapes.index((32, 32))]


def test_every_batch_is_one_bucket_and_every_index_is_covered_each_epoch():
    buckets = [0] * 7 + [1] * 3 + [2] * 10
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=1, world_size=2)
    assert sampler.batches_per_epoch == 2 + 1 + 3
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        assert all(len(batch) == 4 and len({buckets[i] for i in batch}) == 1 for batch in batches)
        seen = Counter(i for batch in batches for i in batch)
        assert set(seen) == set(range(20))
        # Repeats only fill each bucket's last batch: 7 -> 8, 3 -> 4 and 10 -> 12.
        assert sum(seen.values()) - 20 == 1 + 1 + 2


@pytest.mark.parametrize("world_size", [1, 2])
def test_bucket_sampler_resumes_exactly_and_splits_ranks(world_size):
    buckets = [i % 3 for i in range(17)]
    for rank in range(world_size):
        whole = list(islice(BucketBatchSampler(buckets, 2, 4, 0, rank, world_size), 20))
        resumed = list(islice(BucketBatchSampler(buckets, 2, 4, 11, rank, world_size), 9))
        assert resumed == whole[11:]
    if world_size == 2:
        first = [list(islice(BucketBatchSampler(buckets, 2, 4, 0, r, 2), 1))[0] for r in range(2)]
        assert not {i for i, _ in first[0]} & {i for i, _ in first[1]}


def bucket_config(folder, **options) -> DataConfig:
    return DataConfig(dataset="imagefolder", path=str(folder.root), resolution=32, crop="random",
                      random_flip=True, buckets=BucketConfig(enabled=True), **options)


def test_bucketed_batches_have_one_shape_and_several_aspect_ratios(tmp_path):
    folder = clean_folder(tmp_path, count=20)
    train, _, _ = build_datasets(bucket_config(folder))
    shapes = {batch["pixel_values"].shape[2:] for batch in islice(train_batches(train, 2, seed=0), 20)}
    assert len(shapes) >= 3  # square, wide and tall images in their own buckets
    assert all(h * w <= 32 * 32 for h, w in shapes)


@pytest.mark.parametrize("buckets", [False, True])
def test_resume_equals_uninterrupted(tmp_path, buckets):
    folder = clean_folder(tmp_path, count=10)
    config = bucket_config(folder)
    if not buckets:
        config = DataConfig(dataset="imagefolder", path=str(folder.root), resolution=16, crop="random",
                            random_flip=True)
    train, _, _ = build_datasets(config)
    whole = list(islice(train_batches(train, 2, seed=3), 14))  # 5 batches per epoch: crosses two epochs
    rebuilt, _, _ = build_datasets(config)
    resumed = list(islice(train_batches(rebuilt, 2, seed=3, start_batch=8), 6))
    for expected, got in zip(whole[8:], resumed):
        assert got["caption"] == expected["caption"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
    # A later epoch shows the same image with a different crop or flip.
    by_index = {}
    for batch in whole:
        for index, pixels in zip(batch["index"].tolist(), batch["pixel_values"]):
            by_index.setdefault(index, []).append(pixels)
    assert any(not torch.equal(views[0], views[-1]) for views in by_index.values() if len(views) > 1)


def test_loader_workers_give_the_same_batches_and_resume_alike(tmp_path):
    """Images decoded by worker processes ahead of the step: batch k is the same with 0 or 2 workers, from the
    start and resumed, because augmentation is seeded by (seed, epoch, index)."""
    folder = clean_folder(tmp_path, count=10)
    train, _, _ = build_datasets(bucket_config(folder))
    in_process = list(islice(train_batches(train, 2, seed=3), 12))
    with_workers = list(islice(train_batches(train, 2, seed=3, workers=2), 12))
    resumed = list(islice(train_batches(train, 2, seed=3, start_batch=7, workers=2), 5))
    for expected, got in list(zip(in_process, with_workers)) + list(zip(in_process[7:], resumed)):
        assert got["caption"] == expected["caption"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])


class _ProcessGroups(torch.utils.data.Dataset):
    """Each item: the process group of the process that loaded it."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        import os

        return torch.tensor(os.getpgrp())


def test_loader_workers_leave_ctrl_c_and_group_kills_to_the_training_process():
    """Ctrl-C and a kill of the process group would kill the workers mid-step, an error in the trainer, which
    stops gracefully after its step and then shuts its workers down; so workers run in their own group."""
    import os

    workers = next(train_batches(_ProcessGroups(), 2, seed=0, workers=1))
    assert (workers != os.getpgrp()).all()
    assert (next(train_batches(_ProcessGroups(), 2, seed=0)) == os.getpgrp()).all()


def test_auto_loader_workers_are_for_images_read_from_disk(tmp_path, monkeypatch):
    from t2i.data.loader import MAX_AUTO_WORKERS, loader_workers
    from t2i.data.shapes import ShapesDataset

    train, _, _ = build_datasets(bucket_config(clean_folder(tmp_path, count=4)))
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(None, train) == MAX_AUTO_WORKERS
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert loader_workers(None, train) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(None, train) == 0  # both cores stay with the training step
    assert loader_workers(3, train) == 3
    shapes, _, _ = build_datasets(DataConfig(size=8))
    assert isinstance(shapes, ShapesDataset) and loader_workers(None, shapes) == 0
