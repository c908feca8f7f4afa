"""Tar shards, streamed: every good sample once per epoch, bad members quarantined when met, exact resume."""
import json
from collections import Counter

import pytest
import torch

from t2i.config import DataConfig
from t2i.data.build import build_datasets
from t2i.data.loader import train_batches
from t2i.errors import T2IError

from data_fixtures import write_shards


def stream_config(path, **options) -> DataConfig:
    options = {"resolution": 16, "shuffle_buffer": 5, "max_bad_fraction": 0.5, **options}
    return DataConfig(dataset="webdataset", path=str(path), **options)


def captions_of(batches, count) -> list[str]:
    return [caption for _, batch in zip(range(count), batches) for caption in batch["caption"]]


def test_one_epoch_holds_every_good_sample_once_and_quarantines_the_bad(tmp_path, capsys):
    folder = write_shards(tmp_path)
    train, validation, report = build_datasets(stream_config(folder.root), tmp_path / "run")
    assert validation is None and report.shards == 3
    assert capsys.readouterr().out.startswith("data: 3 tar shards, streamed")
    first_epoch = captions_of(train_batches(train, 4, seed=0), 7)[:24]  # the 7th batch ends the first pass
    assert sorted(first_epoch) == sorted(folder.good.values())
    lines = (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()
    assert {r["file"]: r["reason"] for r in map(json.loads, lines)} == folder.bad
    assert train.epoch_length == 24 and train.report().skipped == Counter(folder.bad.values())
    assert first_epoch != sorted(first_epoch)  # shuffled


def test_resume_equals_uninterrupted_across_epochs_and_ranks(tmp_path):
    folder = write_shards(tmp_path)
    config = stream_config(folder.root, crop="random", random_flip=True)
    for world_size in (1, 2):
        for rank in range(world_size):
            whole, _, _ = build_datasets(config, main_process=False)
            reference = [b for _, b in zip(range(9), train_batches(whole, 2, 5, 0, rank, world_size))]
            resumed_stream, _, _ = build_datasets(config, main_process=False)
            resumed = [b for _, b in zip(range(4), train_batches(resumed_stream, 2, 5, 5, rank, world_size))]
            for expected, got in zip(reference[5:], resumed):
                assert got["caption"] == expected["caption"]
                assert torch.equal(got["pixel_values"], expected["pixel_values"])
    # The two ranks of a global batch split it, and no sample is shared between them.
    stream, _, _ = build_datasets(config, main_process=False)
    rank0 = next(train_batches(stream, 2, 5, 0, 0, 2))["caption"]
    rank1 = next(train_batches(stream, 2, 5, 0, 1, 2))["caption"]
    whole = next(train_batches(stream, 4, 5, 0, 0, 1))["caption"]
    assert rank0 + rank1 != whole and sorted(rank0 + rank1) == sorted(whole)


def test_validation_is_held_out_by_name(tmp_path):
    folder = write_shards(tmp_path, bad=False)
    train, validation, _ = build_datasets(stream_config(folder.root, validation_fraction=0.25))
    held = [item["caption"] for item in validation]
    trained = captions_of(train_batches(train, 1, seed=0), 40)
    assert held and set(held).isdisjoint(trained)
    assert len(held) + train.epoch_length == 24


def test_too_many_bad_members_stop_the_stream(tmp_path):
    folder = write_shards(tmp_path, count=8)
    train, _, _ = build_datasets(stream_config(folder.root, max_bad_fraction=0.05))
    with pytest.raises(T2IError, match="4 of 12 entries are bad"):
        captions_of(train_batches(train, 2, seed=0), 20)


@pytest.mark.parametrize("cut", [700, 1500])  # inside the first member's data; inside a header
def test_a_shard_cut_short_is_quarantined(tmp_path, cut):
    folder = write_shards(tmp_path, bad=False)
    broken = folder.root / "shard-001.tar"
    broken.write_bytes(broken.read_bytes()[:cut])
    train, _, _ = build_datasets(stream_config(folder.root), tmp_path / "run")
    captions_of(train_batches(train, 2, seed=0), 10)
    assert train.report().skipped["unreadable shard"] == 1
