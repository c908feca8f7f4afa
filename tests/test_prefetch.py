"""Reading ahead in a thread changes nothing but when items are made: same items, same order, same errors."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from t2i.config import DataConfig
from t2i.data.build import build_datasets
from t2i.data.loader import loader_workers, loading_note, train_batches
from t2i.data.prefetch import ordered_map, prefetched
from t2i.errors import T2IError

from data_fixtures import write_shards


def wait_until(condition, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_depth_zero_is_the_iterator_itself():
    items = iter(range(3))
    assert prefetched(items, 0) is items


def test_items_come_in_order_and_are_made_ahead_by_another_thread():
    made: list[tuple[int, str]] = []

    def counting():
        for i in range(10):
            made.append((i, threading.current_thread().name))
            yield i

    items = prefetched(counting(), depth=3)
    assert next(items) == 0
    # While the consumer holds item 0, the thread fills the queue (3) and makes one more that waits to go in.
    assert wait_until(lambda: len(made) == 5)
    time.sleep(0.2)
    assert len(made) == 5, "the thread may run ahead by the queue's depth and the item in its hands, no further"
    assert list(items) == list(range(1, 10))
    assert {name for _, name in made} == {"t2i-prefetch"}


def test_an_error_reaches_the_consumer_at_the_item_that_failed():
    def failing():
        yield 1
        yield 2
        raise T2IError("shard 3 is bad")

    items = prefetched(failing(), depth=4)
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(T2IError, match="shard 3 is bad"):
        next(items)


def test_closing_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    items = prefetched(endless(), depth=2)
    assert next(items) == 0
    items.close()
    assert not any(t.name == "t2i-prefetch" for t in threading.enumerate())
    assert threading.active_count() == before


def test_ordered_map_keeps_the_order_of_calls_that_end_out_of_order():
    def slow_first(i):
        time.sleep(0.05 if i % 3 == 0 else 0.0)
        if i == 7:
            raise ValueError("item 7")
        return i * i

    with ThreadPoolExecutor(3) as pool:
        results = ordered_map(slow_first, range(10), pool, ahead=4)
        assert [next(results) for _ in range(7)] == [i * i for i in range(7)]
        with pytest.raises(ValueError, match="item 7"):
            next(results)
    assert list(ordered_map(slow_first, range(5), None, ahead=4)) == [0, 1, 4, 9, 16]


def test_streamed_batches_are_the_same_with_worker_threads_and_resume_alike(tmp_path):
    folder = write_shards(tmp_path)
    config = DataConfig(dataset="webdataset", path=str(folder.root), resolution=16, shuffle_buffer=5,
                        max_bad_fraction=0.5, crop="random", random_flip=True)

    def batches(start, count, workers, rank=0, world_size=1):
        stream, _, _ = build_datasets(config, main_process=False)
        made = train_batches(stream, 3, 5, start, rank, world_size, workers=workers)
        return [b for _, b in zip(range(count), made)], stream

    in_line, stream = batches(0, 11, workers=0)  # 11 batches of 3: past the first epoch of 24 good samples
    for workers in (1, 3):
        ahead, ahead_stream = batches(0, 11, workers)
        resumed, _ = batches(6, 5, workers)
        for reference, got in [*zip(in_line, ahead, strict=True), *zip(in_line[6:], resumed, strict=True)]:
            assert got["caption"] == reference["caption"]
            assert torch.equal(got["pixel_values"], reference["pixel_values"])
        assert ahead_stream.report().skipped == stream.report().skipped  # every bad member quarantined, once
    # The second of two processes keeps its own half of each global batch, with threads as in line.
    for reference, got in zip(batches(2, 4, 0, rank=1, world_size=2)[0], batches(2, 4, 3, rank=1, world_size=2)[0],
                              strict=True):
        assert got["caption"] == reference["caption"]
        assert torch.equal(got["pixel_values"], reference["pixel_values"])


def test_streamed_shards_get_worker_threads_as_image_folders_get_processes(tmp_path, monkeypatch):
    stream, _, _ = build_datasets(DataConfig(dataset="webdataset", path=str(write_shards(tmp_path).root),
                                             resolution=16), main_process=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(None, stream) == 0  # a fine-tune on this 2-core CPU ran 8% slower with one thread
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(None, stream) == 4 and loader_workers(2, stream) == 2


def test_the_log_says_how_images_read_from_disk_are_loaded(tmp_path):
    from data_fixtures import clean_folder

    stream, _, _ = build_datasets(DataConfig(dataset="webdataset", path=str(write_shards(tmp_path).root),
                                             resolution=16), main_process=False)
    folder, _, _ = build_datasets(DataConfig(dataset="imagefolder", path=str(clean_folder(tmp_path, count=4).root),
                                             resolution=16))
    assert loading_note(stream, 0) == loading_note(folder, 0) == (
        "images are decoded in the training process, between steps (loader_workers: 0)")
    assert loading_note(stream, 1).startswith("a thread reads the shards 2 batches ahead and decodes their images")
    assert "3 threads decode their images (loader_workers: 3)" in loading_note(stream, 3)
    assert loading_note(folder, 2) == "2 worker processes decode images ahead of the step (loader_workers: 2)"
    assert loading_note(build_datasets(DataConfig(size=8))[0], 0) is None  # shapes, in memory
