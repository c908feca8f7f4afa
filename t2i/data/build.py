"""The one entry point from `data` config to datasets: `build_datasets(config, run_dir)`.

    train, validation, report = build_datasets(config.data, run_dir)

Map-style sources (imagefolder, datasets) are listed in sorted order and checked up front (`t2i.data.scan`); the bad
and left-out entries go to run_dir/quarantine.jsonl, which every scan rewrites whole; one line says what was kept
and skipped, a note names the left-out files, and the build stops when more than `data.max_bad_fraction` is bad. Tar
shards (webdataset) are streamed and checked as they are met (`t2i.data.sources.webdataset.ShardStream`); use
`t2i.data.loader.train_batches` to batch any of them. Nothing depends on the process's rank, so every rank of a
multi-process run keeps the same samples in the same order. Items are {"pixel_values", "caption", "index"}, as the
shapes dataset gives.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from t2i.config import DataConfig
from t2i.data.buckets import assign_buckets, bucket_shapes
from t2i.data.image_captions import ImageCaptionDataset
from t2i.data.quarantine import QUARANTINE_FILE, Quarantine, ScanReport, left_out_notes, write_quarantine
from t2i.data.scan import scan
from t2i.data.shapes import ShapesDataset
from t2i.data.sources.entry import Entry
from t2i.data.sources.imagefolder import list_imagefolder
from t2i.data.sources.webdataset import ShardStream, StreamOptions, list_shards
from t2i.data.split import split_validation

Datasets = tuple[Dataset, Dataset | None, ScanReport]


def detect_source(path: str) -> str:
    """The `data.dataset` kind that fits what is at `path`: .tar shards, a `datasets` table (a save_to_disk
    folder or a data file), or an image folder; a name that is nothing on disk is taken for a hub dataset."""
    location = Path(path)
    if location.suffix == ".tar" or (location.is_dir() and any(location.glob("*.tar"))):
        return "webdataset"
    if location.is_file() or (location / "dataset_info.json").is_file() or (location / "dataset_dict.json").is_file():
        return "datasets"
    return "imagefolder" if location.is_dir() else "datasets"


def build_datasets(config: DataConfig, run_dir: Path | None = None, main_process: bool = True) -> Datasets:
    """(train, validation or None, report) for `config.dataset`.

    Only the main process (`main_process`) writes the quarantine file and prints the summary line; every
    process makes the same datasets and the same report.
    """
    quarantine_path = run_dir / QUARANTINE_FILE if run_dir is not None else None
    train, validation, report = _BUILDERS[config.dataset](config, quarantine_path if main_process else None, run_dir)
    report.quarantine_path = quarantine_path
    if main_process:
        print("\n".join([report.summary(), *report.notes]), flush=True)
    if report.shards is None:  # a stream checks as it goes (t2i.data.sources.webdataset)
        report.check(config.max_bad_fraction)
    return train, validation, report


def _shapes(config: DataConfig, quarantine_path: Path | None, run_dir: Path | None) -> Datasets:
    dataset = ShapesDataset(size=config.size, resolution=config.resolution, seed=config.seed,
                            held_out=config.held_out_pairs, two_object_fraction=config.two_object_fraction,
                            paraphrase_prob=config.paraphrase_prob, partial_caption_prob=config.partial_caption_prob,
                            partial_omits=config.partial_caption_omits)
    return dataset, None, ScanReport(kept=len(dataset))


def _imagefolder(config: DataConfig, quarantine_path: Path | None, run_dir: Path | None) -> Datasets:
    # A run folder inside the image folder (`--data . --out runs/mine`) holds sample grids, not training images.
    entries = list_imagefolder(Path(config.path), config.caption_column, skip=run_dir)
    return _scanned(entries, config, quarantine_path)


def _hf_datasets(config: DataConfig, quarantine_path: Path | None, run_dir: Path | None) -> Datasets:
    from t2i.data.sources.hf_datasets import list_hf_dataset  # imports `datasets` only when asked for

    entries = list_hf_dataset(config.path, config.image_column, config.caption_column, config.split)
    return _scanned(entries, config, quarantine_path)


def _webdataset(config: DataConfig, quarantine_path: Path | None, run_dir: Path | None) -> Datasets:
    shards = list_shards(Path(config.path))
    quarantine = Quarantine(quarantine_path)
    options = StreamOptions(config.resolution, config.crop, config.random_flip, config.seed, config.shuffle_buffer,
                            config.smallest_image_side, config.max_caption_length, config.max_bad_fraction,
                            config.validation_fraction)
    train = ShardStream(shards, options, quarantine, quarantine.path)
    validation = (ShardStream(shards, options, quarantine, quarantine.path, validation=True)
                  if config.validation_fraction > 0 else None)
    return train, validation, ScanReport(kept=0, shards=len(shards))


def _scanned(entries: list[Entry], config: DataConfig, quarantine_path: Path | None) -> Datasets:
    quarantine = Quarantine()
    samples = scan(entries, config.smallest_image_side, config.max_caption_length, quarantine)
    if quarantine_path is not None:
        write_quarantine(quarantine_path, quarantine.entries)
    report = ScanReport(kept=len(samples), skipped=quarantine.counts, notes=left_out_notes(quarantine.entries),
                        images=len({sample.name for sample in samples}))
    if note := _several_captions_note(samples):
        report.notes.append(note)
    train_samples, validation_samples = split_validation(samples, config.validation_fraction)
    if validation_samples:
        report.notes.append(f"data: {len(validation_samples)} of them held out for validation "
                            f"(data.validation_fraction {config.validation_fraction:g}), {len(train_samples)} to train on")
    elif config.validation_fraction > 0 and samples:
        report.notes.append(f"data: data.validation_fraction {config.validation_fraction:g} of {len(samples)} samples "
                            "holds none out, so all train and no validation loss is scored; raise it to hold some out")
    shapes = None
    if config.buckets.enabled:
        buckets = bucket_shapes(config.resolution, config.buckets.step, config.buckets.max_aspect_ratio)
        shapes = [buckets[b] for b in assign_buckets([(s.width, s.height) for s in train_samples], buckets)]
    train = ImageCaptionDataset(train_samples, config.resolution, config.crop, config.random_flip, config.seed,
                                shapes)
    # Validation images are always the centred square: the same pixels every time they are scored.
    validation = (ImageCaptionDataset(validation_samples, config.resolution, "center", False, config.seed)
                  if validation_samples else None)
    return train, validation, report


def _several_captions_note(samples: list) -> str | None:
    """One line on the images that have several captions (several metadata rows), or None when none has."""
    captions = Counter(sample.name for sample in samples)
    several = [count for count in captions.values() if count > 1]
    if not several:
        return None
    which = f"1 image has {several[0]} captions" if len(several) == 1 else f"{len(several)} images have several captions"
    return f"data: {which}; each caption is a sample of its own"


# Each builder is given the quarantine file to write (None on the processes that write nothing) and the run folder.
_BUILDERS: dict[str, Callable[[DataConfig, Path | None, Path | None], Datasets]] = {
    "shapes": _shapes,
    "imagefolder": _imagefolder,
    "datasets": _hf_datasets,
    "webdataset": _webdataset,
}
