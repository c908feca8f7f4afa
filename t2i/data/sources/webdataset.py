"""Tar shards in the webdataset layout (`key.jpg` + `key.txt`), streamed: data larger than memory.

Shards (uncompressed .tar) are read with the standard library's `tarfile` in stream mode; consecutive members that share a key (the
member's path up to the first dot of its file name) make one sample. Nothing is checked up front: a bad member
is quarantined, as "shard.tar:key", when the stream meets it.

Invariant: the stream of good samples is a pure function of (seed, epoch) and the shards' bytes. Epoch e reads
the shards in an order permuted by (seed, e) and mixes them through a shuffle buffer seeded by (seed, e). Global
batch k is positions [k·B, (k+1)·B) of the concatenated epochs (B = batch_size × world_size), split between the
processes as `ResumableBatchSampler` splits a batch, and the augmentation of a sample is seeded by (seed, epoch,
its position in the epoch). So resuming at micro-batch k is exact: it replays the stream up to position k·B,
decoding (to know which samples are good) but not transforming. The first pass learns how many good samples an
epoch holds; after it, whole epochs are skipped without reading, so a resume costs at most about two epochs of
reading. Every process reads every shard (they must agree on which samples are good), which trades reading
time for exactness.

The bad fraction is checked when the first pass ends, and early once `EARLY_CHECK_AFTER` entries were met.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from torch.utils.data import IterableDataset, default_collate

from t2i.data.prefetch import ordered_map
from t2i.data.quarantine import CAPTION_NOT_UTF8, NOT_A_FILE, UNREADABLE_SHARD, Quarantine, Rejected, ScanReport
from t2i.data.scan import Sample, check_entry
from t2i.data.sources.entry import Entry
from t2i.data.split import holdout_score
from t2i.data.transforms import Crop, resize_crop_flip, sample_generator, to_tensor
from t2i.errors import T2IError

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"})
CAPTION_EXTENSION = "txt"
EARLY_CHECK_AFTER = 200


def list_shards(path: Path) -> list[Path]:
    """A single .tar file, or every .tar file in a folder, sorted by name."""
    shards = [path] if path.is_file() else sorted(path.glob("*.tar")) if path.is_dir() else []
    if not shards:
        raise T2IError(f"data.path '{path}' is neither a .tar shard nor a folder holding some")
    return shards


def read_shard(shard: Path, quarantine: Quarantine) -> Iterator[Entry]:
    """The shard's samples in member order, streamed; a shard that cannot be read to its end-of-archive marker
    is quarantined from the point where it breaks (the samples before it stay)."""
    group: dict[str, bytes] = {}
    key, problem = None, None
    try:
        with shard.open("rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.isdir():
                    continue
                path = PurePosixPath(member.name)
                member_key = str(path.parent / path.name.split(".", 1)[0])
                if member_key != key:
                    if key is not None:
                        yield _entry(shard, key, group, problem)
                    key, group, problem = member_key, {}, None
                if not member.isfile():
                    problem = Rejected(NOT_A_FILE, member.name)
                    continue
                extension = path.name.split(".", 1)[1].lower() if "." in path.name else ""
                group[extension] = tar.extractfile(member).read()
                if len(group[extension]) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
            # tarfile ends quietly where a header is cut off; a whole archive ends with a zero block.
            raw.seek(tar.offset)
            if raw.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset}: the shard is cut short")
    except (tarfile.TarError, OSError, EOFError) as error:
        quarantine.add(shard.name, UNREADABLE_SHARD, str(error))
        return
    if key is not None:
        yield _entry(shard, key, group, problem)


def _entry(shard: Path, key: str, group: dict[str, bytes], problem: Rejected | None) -> Entry:
    image = next((group[ext] for ext in sorted(group) if ext in IMAGE_EXTENSIONS), None)
    caption = group.get(CAPTION_EXTENSION)
    if caption is not None and problem is None:
        try:
            caption = caption.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            caption, problem = None, Rejected(CAPTION_NOT_UTF8, str(error))
    return Entry(f"{shard.name}:{key}", image, caption, problem)


@dataclass(frozen=True)
class StreamOptions:
    resolution: int
    crop: Crop
    random_flip: bool
    seed: int  # augmentation
    shuffle_buffer: int
    min_side: int
    max_caption_length: int
    max_bad_fraction: float
    validation_fraction: float


class ShardStream(IterableDataset):
    """The training stream (`validation=False`: shuffled, endless) or the held-out samples (one pass, in order,
    centred). Items are {"pixel_values", "caption", "index"}, `index` being the position in the epoch."""

    def __init__(self, shards: list[Path], options: StreamOptions, quarantine: Quarantine,
                 quarantine_path: Path | None = None, validation: bool = False):
        self.shards, self.options, self.quarantine = shards, options, quarantine
        self.quarantine_path, self.validation = quarantine_path, validation
        self.epoch_length: int | None = None  # good samples per epoch, known after the first full pass
        self._good_met = 0

    def report(self) -> ScanReport:
        """What the stream has met so far: good samples of the first pass, and every bad entry."""
        return ScanReport(kept=self._good_met, skipped=self.quarantine.counts, quarantine_path=self.quarantine_path)

    def _entries(self, order_seed: int, epoch: int) -> Iterator[Entry]:
        """Epoch `epoch`'s entries of this part (train or validation), before any check."""
        shards = self.shards
        if not self.validation:
            generator = torch.Generator().manual_seed(order_seed * 7919 + epoch)
            shards = [shards[i] for i in torch.randperm(len(shards), generator=generator).tolist()]
        fraction = self.options.validation_fraction
        for shard in shards:
            for entry in read_shard(shard, self.quarantine):
                if (fraction > 0 and holdout_score(entry.name) < fraction) == self.validation:
                    yield entry

    def _shuffled(self, entries: Iterator[Entry], order_seed: int, epoch: int) -> Iterator[Entry]:
        """A bounded shuffle buffer: each entry leaves from a random slot, refilled by the next one read."""
        generator = torch.Generator().manual_seed(order_seed * 7919 + epoch + 1)
        buffer: list[Entry] = []
        for entry in entries:
            if len(buffer) < self.options.shuffle_buffer:
                buffer.append(entry)
                continue
            slot = int(torch.randint(len(buffer), (), generator=generator))
            buffer[slot], entry = entry, buffer[slot]
            yield entry
        for i in torch.randperm(len(buffer), generator=generator).tolist():
            yield buffer[i]

    def _check(self, entry: Entry) -> tuple[Entry, tuple[Sample, Image.Image] | Rejected]:
        try:
            return entry, check_entry(entry, self.options.min_side, self.options.max_caption_length)
        except Rejected as rejected:
            return entry, rejected

    def _checked(self, order_seed: int, epoch: int, pool: Executor | None = None, ahead: int = 0
                 ) -> Iterator[tuple[Sample, Image.Image]]:
        """Epoch `epoch`'s good entries with their RGB image, in order, decoded up to `ahead` entries ahead by
        `pool`'s threads if given; bad ones go to the quarantine."""
        entries = self._entries(order_seed, epoch)
        if not self.validation:
            entries = self._shuffled(entries, order_seed, epoch)
        count = 0
        for entry, checked in ordered_map(self._check, entries, pool, ahead):
            if isinstance(checked, Rejected):
                self.quarantine.add(entry.name, checked.reason, checked.detail)
                self._check_early()
                continue
            sample, rgb = checked
            count += 1
            if self.epoch_length is None:
                self._good_met = count
            yield sample, rgb
        if self.epoch_length is None and not self.validation:
            self.epoch_length = count
            self.report().check(self.options.max_bad_fraction)

    def _check_early(self) -> None:
        report = self.report()
        if self.epoch_length is None and report.total >= EARLY_CHECK_AFTER:
            report.check(self.options.max_bad_fraction)

    def _item(self, sample: Sample, rgb: Image.Image, epoch: int, position: int, augment: bool = True) -> dict:
        size = self.options.resolution
        crop, flip = (self.options.crop, self.options.random_flip) if augment else ("center", False)
        image = resize_crop_flip(rgb, size, size, crop, flip, sample_generator(self.options.seed, epoch, position))
        return {"pixel_values": to_tensor(image), "caption": sample.caption, "index": position}

    def __iter__(self) -> Iterator[dict]:
        if self.validation:
            for position, (sample, rgb) in enumerate(self._checked(0, 0)):
                yield self._item(sample, rgb, 0, position, augment=False)
            return
        for batch in self.batches(1, seed=self.options.seed):
            yield {key: value[0] for key, value in batch.items()}

    def batches(self, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                threads: int = 1) -> Iterator[dict]:
        """This process's collated micro-batches, forever, from global batch `start_batch` on; the order is
        seeded by `seed`, as `ResumableBatchSampler` is. With `threads` > 1 that many threads decode and
        transform images; the batches are the same."""
        with ThreadPoolExecutor(threads, thread_name_prefix="t2i-decode") if threads > 1 else nullcontext() as pool:
            yield from self._batches(batch_size, seed, start_batch, rank, world_size, pool, 2 * threads)

    def _batches(self, batch_size: int, seed: int, start_batch: int, rank: int, world_size: int,
                 pool: Executor | None, decode_ahead: int) -> Iterator[dict]:
        global_batch = batch_size * world_size
        to_skip = start_batch * global_batch
        chunk: list[dict | Future | None] = []  # this process's items (or their making); None for the others'
        epoch = 0
        while True:
            if self.epoch_length is not None and to_skip >= self.epoch_length:
                if self.epoch_length == 0:
                    raise T2IError("data: the shards hold no good training samples")
                to_skip -= self.epoch_length
                epoch += 1
                continue
            for position, (sample, rgb) in enumerate(self._checked(seed, epoch, pool, decode_ahead)):
                if to_skip:
                    to_skip -= 1
                    continue
                if len(chunk) % world_size != rank:
                    chunk.append(None)
                elif pool is None:
                    chunk.append(self._item(sample, rgb, epoch, position))
                else:  # transformed as soon as a thread is free, so that no batch of full-size images piles up
                    chunk.append(pool.submit(self._item, sample, rgb, epoch, position))
                if len(chunk) == global_batch:
                    mine = chunk[rank::world_size]
                    yield default_collate([item.result() if isinstance(item, Future) else item for item in mine])
                    chunk = []
            if self.epoch_length == 0:
                raise T2IError("data: the shards hold no good training samples")
            epoch += 1
