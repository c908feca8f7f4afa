"""Any `datasets` dataset: a `save_to_disk` folder, a local data file (parquet, arrow, csv, json), or a hub
name when online; images from `image_column` (encoded images, or paths to image files), captions from
`caption_column`.

Images are read undecoded (`Image(decode=False)`), so that `t2i.data.scan` decodes them with its own checks
and a bad image is quarantined instead of raising inside `datasets`. Entries are named "split[row]".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import datasets

from t2i.data.quarantine import MISSING_IMAGE, NOT_AN_IMAGE, Rejected
from t2i.data.sources.entry import Entry
from t2i.data.sources.imagefolder import METADATA_FILES
from t2i.errors import T2IError

# `datasets` builders that read a local data file, by its extension.
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_table(path: str, split: str) -> datasets.Dataset:
    """One split of the dataset at `path` (a save_to_disk folder, a data file, or a hub name)."""
    local = Path(path)
    try:
        if local.is_dir():
            _check_saved_has_rows(local)
            loaded = datasets.load_from_disk(str(local))
        elif local.is_file():
            if local.suffix.lower() not in FILE_BUILDERS:
                raise T2IError(f"data.path '{path}': datasets reads {', '.join(FILE_BUILDERS)} files, "
                               f"not '{local.suffix}'")
            _check_has_rows(local)
            loaded = datasets.load_dataset(FILE_BUILDERS[local.suffix.lower()], data_files={split: str(local)})
        else:
            loaded = datasets.load_dataset(path)
    except T2IError:
        raise
    except Exception as error:  # `datasets` raises many types: missing folders, no network, bad files
        where = "" if local.exists() else " (no folder or file of that name is here, so the Hub was asked)"
        raise T2IError(f"data.path '{path}' could not be loaded as a datasets dataset{where}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise T2IError(f"data.split '{split}' is not in '{path}'; it has {', '.join(loaded)}")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise T2IError(f"data.path '{path}' holds no rows{f' in split {split!r}' if local.is_dir() else ''}: "
                       "there are no images to train on")
    return loaded


def _check_saved_has_rows(folder: Path) -> None:
    """A `save_to_disk` folder of no rows has no data files, and `load_from_disk` fails on it with an IndexError."""
    try:
        files = json.loads((folder / "state.json").read_text())["_data_files"]
    except (OSError, ValueError, KeyError, TypeError):  # not a saved Dataset (a DatasetDict, other files): load it
        return
    if files == []:
        raise T2IError(f"data.path '{folder}' holds no rows: there are no images to train on")


def _check_has_rows(file: Path) -> None:
    """An empty file, or a table of no rows, said plainly: `datasets` fails on them deep inside."""
    if file.stat().st_size == 0:
        raise T2IError(f"data.path '{file}' is an empty file: there are no images to train on")
    if file.suffix.lower() == ".csv":
        with open(file, encoding="utf-8", errors="replace") as lines:
            if len(list(islice((line for line in lines if line.strip()), 2))) < 2:
                raise T2IError(f"data.path '{file}' holds a header and no rows: there are no images to train on")
    if file.suffix.lower() == ".parquet":
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.ParquetFile(file).metadata.num_rows
        except Exception as error:  # pyarrow's own types: not parquet, cut short
            raise T2IError(f"data.path '{file}' is not a readable parquet file: {error}") from None
        if rows == 0:
            raise T2IError(f"data.path '{file}' holds no rows: there are no images to train on")


@dataclass(frozen=True)
class RowImage:
    """Reads the encoded bytes of one row's image, when the scan or the dataset asks for them. A string is a path
    to the image file (the only way a csv or json table holds images): absolute, or relative to `base`."""

    table: datasets.Dataset
    row: int
    column: str
    base: Path

    def __call__(self) -> bytes | Path:
        value = self.table[self.row][self.column]
        if isinstance(value, dict):  # an undecoded datasets.Image: bytes, or a path to the file
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                return Path(value["path"]).read_bytes()
        if isinstance(value, bytes):
            return value
        if value is None:
            raise Rejected(MISSING_IMAGE, f"column '{self.column}' is empty in this row")
        if isinstance(value, str):
            if "://" in value:
                raise Rejected(NOT_AN_IMAGE, f"column '{self.column}' holds a URL, and t2i downloads no images")
            if not value.strip():
                raise Rejected(MISSING_IMAGE)
            return self.base / value  # checked by the scan as an image folder's files are: missing, not a file
        raise Rejected(NOT_AN_IMAGE, f"column '{self.column}' holds {type(value).__name__}")


def _path_base(path: str) -> Path:
    """What relative image paths in the table at `path` are relative to: the folder of a data file, a saved
    folder itself, or the working folder for a hub name."""
    local = Path(path)
    return local.parent if local.is_file() else local if local.is_dir() else Path.cwd()


def list_hf_dataset(path: str, image_column: str, caption_column: str, split: str = "train") -> list[Entry]:
    table = load_table(path, split)
    if Path(path).name in METADATA_FILES and image_column not in table.column_names:
        raise T2IError(f"'{path}' is an image folder's metadata file: give its folder ('{Path(path).parent}') as "
                       "the data path, and the images beside it are read with their captions")
    for column in (image_column, caption_column):
        if column not in table.column_names:
            raise T2IError(f"'{path}' has no column '{column}' (it has {', '.join(table.column_names)}); set "
                           "data.image_column and data.caption_column")
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    captions = table[caption_column]
    base = _path_base(path)
    return [Entry(f"{split}[{row}]", RowImage(table, row, image_column, base), text)
            for row, caption in enumerate(captions) for text in _row_captions(caption)]


def _row_captions(caption) -> list[str | None]:
    """A row's captions: its one caption, or each of a list of them (COCO's several captions an image), each a
    sample of its own as in an image folder; None where a caption is missing."""
    if isinstance(caption, (list, tuple)):
        return [None if text is None else str(text) for text in caption] or [None]
    return [None if caption is None else str(caption)]
