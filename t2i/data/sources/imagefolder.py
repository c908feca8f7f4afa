"""An image folder, captioned one of two ways:

- `metadata.jsonl` or `metadata.csv` at the root (the `datasets` imagefolder convention): one row per image, its
  path relative to the root in `file_name`, its caption in the caption column (default `text`);
- sidecar captions, when there is no metadata file: every image `a/x.png` is captioned by `a/x.txt`. An image is
  a file of the common extensions (`IMAGE_EXTENSIONS`), captioned or not, or of any other extension PIL reads
  (`.jfif`, `.tga`, ...) when it has a caption. A caption that pairs with no image (`x.txt` beside `x.heic` or
  `x.jpg.bak`, or beside nothing) is left out (`CAPTION_WITHOUT_IMAGE`), naming the files beside it.

A `file_name` on several rows with different captions is an image with several captions (COCO's way): each row
is a sample of its own. A row that repeats an earlier row's file and caption is quarantined as a duplicate naming
that line.
An image (of any extension PIL reads) in a folder with a metadata file but no row in it is left out
(`NOT_IN_METADATA`): counted and named, not trained on, and not held against `data.max_bad_fraction`.

Every `file_name` must stay inside the root: an absolute path, a `..` part, or a path that resolves (through
symlinks) outside the root is quarantined as escaping it. Entries are sorted by name, so the listing is the
same on every process and every run.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from functools import cache
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from PIL import Image

from t2i.data.quarantine import (
    BAD_METADATA_ROW,
    CAPTION_NOT_UTF8,
    CAPTION_WITHOUT_IMAGE,
    DUPLICATE_ROW,
    ESCAPES_ROOT,
    NOT_IN_METADATA,
    RUN_FOLDER,
    Rejected,
)
from t2i.data.sources.entry import Entry
from t2i.errors import T2IError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_NAME_COLUMN = "file_name"
# The extensions PIL reads that image folders commonly hold (the `datasets` imagefolder list, in short).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_EXTENSION = ".txt"
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


class Row(NamedTuple):
    """A metadata row: the line it starts on and its entry. An unreadable row's entry is named by its line, and
    `file` then holds the file it seems to name, so that this file is not reported as unlisted as well."""

    line: int
    entry: Entry
    file: str = ""


def list_imagefolder(root: Path, caption_column: str = "text", skip: Path | None = None) -> list[Entry]:
    """Every entry of the folder, sorted by name; bad ones carry their `problem`. `skip` is a folder under root that
    holds no data: the run's own folder, whose sample grids are not training images."""
    if not root.is_dir():
        raise T2IError(f"data.path '{root}' is not a folder")
    present = [name for name in METADATA_FILES if (root / name).is_file()]
    if len(present) > 1:
        raise T2IError(f"'{root}' holds both {' and '.join(present)}; keep one")
    if present == ["metadata.jsonl"]:
        rows = _jsonl_rows(root, caption_column)
    elif present == ["metadata.csv"]:
        rows = _csv_rows(root, caption_column)
    else:
        return sorted(_sidecar_entries(root, skip), key=lambda entry: entry.name)
    entries = _distinct_rows(rows, present[0]) + _unlisted_images(root, present[0], rows, skip)
    return sorted(entries, key=lambda entry: entry.name)


def resolve_inside(root: Path, file_name: str) -> Path:
    """`root / file_name`, or `Rejected(ESCAPES_ROOT)` when that is absolute, climbs with `..`, or is a
    symlink (or under one) that points outside the root."""
    if file_name.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(file_name) or os.path.isabs(file_name):
        raise Rejected(ESCAPES_ROOT, "absolute path")
    if ".." in PurePosixPath(file_name.replace("\\", "/")).parts:
        raise Rejected(ESCAPES_ROOT, "'..' in path")
    path = root / file_name
    if not path.resolve().is_relative_to(root.resolve()):
        raise Rejected(ESCAPES_ROOT, f"resolves to {path.resolve()}")
    return path


def _row_entry(root: Path, file_name: object, caption: object, name: str) -> Entry:
    if not isinstance(file_name, str) or not file_name:
        return Entry(name, None, None, Rejected(BAD_METADATA_ROW, f"no '{FILE_NAME_COLUMN}'"))
    caption = None if caption is None else str(caption)
    try:
        return Entry(file_name, resolve_inside(root, file_name), caption)
    except Rejected as problem:
        return Entry(file_name, None, caption, problem)


def _jsonl_rows(root: Path, caption_column: str) -> list[Row]:
    rows = []
    lines = (root / "metadata.jsonl").read_bytes().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        name = f"metadata.jsonl:{number}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:  # also bad UTF-8
            rows.append(Row(number, Entry(name, None, None, Rejected(BAD_METADATA_ROW, str(error)))))
            continue
        rows.append(Row(number, _row_entry(root, row.get(FILE_NAME_COLUMN), row.get(caption_column), name)))
    return rows


def _csv_rows(root: Path, caption_column: str) -> list[Row]:
    """The rows of metadata.csv, each numbered by the line it starts on. A row with more or fewer cells than the
    header (a caption's comma left unquoted) is quarantined, naming its line; a quote left open stops the scan,
    since every row after it would be read into one caption."""
    path = root / "metadata.csv"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise T2IError(f"'{path}' is not UTF-8 text: {error}") from None
    (_, header), *records = _csv_records(path, text) or [(1, [])]
    _check_csv_header(path, header, caption_column)
    file_cell, caption_cell = header.index(FILE_NAME_COLUMN), header.index(caption_column)
    rows = []
    for number, cells in records:
        name = f"metadata.csv:{number}"
        if len(cells) != len(header):
            detail = (f"{len(cells)} cell{'' if len(cells) == 1 else 's'} where the header has {len(header)}; "
                      "put a caption that holds a comma in double quotes")
            file = cells[file_cell] if file_cell < len(cells) else ""
            rows.append(Row(number, Entry(name, None, None, Rejected(BAD_METADATA_ROW, detail)), file))
        else:
            rows.append(Row(number, _row_entry(root, cells[file_cell], cells[caption_cell], name)))
    return rows


def _csv_records(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """(first line, cells) of every record that is not blank; a quote left open is a `T2IError` naming its line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, start = [], 1
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                _check_quotes_closed(path, start, cells)
                records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as error:
        raise T2IError(f"'{path}' line {start}: a quoted cell is not closed where it should be ({error}); close "
                       'its quote, and write a quote inside a quoted caption as two ("")') from None
    return records


def _check_quotes_closed(path: Path, start: int, cells: list[str]) -> None:
    """A quoted cell may span lines, but one whose later line looks like a row of its own (an image's name, then a
    comma) is a quote left open until some later quote happened to close it."""
    for cell in cells:
        for line in cell.splitlines()[1:]:
            if "," in line and _pil_reads(line.split(",", 1)[0].strip()):
                raise T2IError(f"'{path}' line {start}: a quoted cell runs on into the row '{line}'; close its quote")


def _check_csv_header(path: Path, header: list[str], caption_column: str) -> None:
    example = f"{FILE_NAME_COLUMN},{caption_column}"
    if FILE_NAME_COLUMN not in header and any(_pil_reads(cell.strip()) for cell in header):
        raise T2IError(f"'{path}' has no header row: its first row, '{','.join(header)}', must name the columns, "
                       f"as '{example}' does; add such a line at the top")
    if FILE_NAME_COLUMN not in header:
        raise T2IError(f"'{path}' has no '{FILE_NAME_COLUMN}' column (it has {', '.join(header) or 'none'}); "
                       f"its first row must name the columns, as '{example}' does")
    if caption_column not in header:
        raise T2IError(f"'{path}' has no '{caption_column}' column (it has {', '.join(header)}); "
                       "set data.caption_column to the caption's column")


def _distinct_rows(rows: list[Row], metadata: str) -> list[Entry]:
    """Every row but those repeating an earlier row's file and caption, which are quarantined as duplicates of it.

    A repeated row is a pasted or merged one: training on both would weigh that image twice without saying so.
    The same file with another caption is one more caption of it, as COCO-style metadata lists them.
    """
    first_line: dict[tuple[str, str | None], int] = {}
    entries = []
    for number, entry, _ in rows:
        key = (PurePosixPath(entry.name).as_posix(), entry.caption)
        if key in first_line and entry.problem is None:
            detail = f"{entry.name} with the same caption is already on line {first_line[key]}"
            entries.append(Entry(f"{metadata}:{number}", None, None, Rejected(DUPLICATE_ROW, detail)))
            continue
        first_line.setdefault(key, number)
        entries.append(entry)
    return entries


def _unlisted_images(root: Path, metadata: str, rows: list[Row], skip: Path | None) -> list[Entry]:
    """The images under root (but not under `skip`) that no row of `metadata` names, as left-out entries."""
    listed = {PurePosixPath(name).as_posix() for row in rows for name in (row.entry.name, row.file) if name}
    images, left_out = _folder_files(root, skip)
    return [Entry(name, None, None, Rejected(NOT_IN_METADATA, f"{metadata} has no row for it"))
            for name in images if _pil_reads(name) and name not in listed] + [
        entry for entry in left_out if entry.problem.reason == RUN_FOLDER]


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _pil_reads(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in _pil_extensions()


@cache
def _pil_extensions() -> frozenset[str]:
    """Every extension PIL has a reader for (`Image.init` loads all its plugins, hence once, on first use)."""
    Image.init()
    return frozenset(extension for extension, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def _caption_name(name: str) -> str:
    return PurePosixPath(name).with_suffix(CAPTION_EXTENSION).as_posix()


def _stem(name: str) -> str:
    """The name up to the first dot of the file's own name: "a/x.jpg.bak" -> "a/x"."""
    folder, slash, file = name.rpartition("/")
    return folder + slash + file.split(".", 1)[0]


def _is_run_folder(path: Path) -> bool:
    """Does `path` hold a t2i run (`--data . --out runs/a`, then `--out runs/b`): its config.yaml and a stage folder
    with metrics?"""
    try:
        return (path / "config.yaml").is_file() and any((child / "metrics.jsonl").is_file()
                                                         for child in path.iterdir() if child.is_dir())
    except OSError:  # an unreadable folder is walked (and reported) as any other
        return False


def _folder_files(root: Path, skip: Path | None = None) -> tuple[list[str], list[Entry]]:
    """The name of every file under root, hidden files and folders and the folder `skip` aside, and an entry for each
    symlinked folder that points out of the root or holds another t2i run (left out). Symlinked folders are followed
    while they stay inside it (each real folder once)."""
    names, escaping = [], []
    visited = {root.resolve()} | ({skip.resolve()} if skip is not None else set())
    for folder, subfolders, files in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(subfolders):
            path = Path(folder) / name
            if name.startswith(".") or path.resolve() in visited:
                continue
            try:
                resolve_inside(root, path.relative_to(root).as_posix())
                if _is_run_folder(path):
                    raise Rejected(RUN_FOLDER)
            except Rejected as problem:
                escaping.append(Entry(path.relative_to(root).as_posix() + "/", None, None, problem))
                continue
            visited.add(path.resolve())
            kept.append(name)
        subfolders[:] = kept
        names += [(Path(folder) / file).relative_to(root).as_posix() for file in files if not file.startswith(".")]
    return names, escaping


def _sidecar_entries(root: Path, skip: Path | None) -> list[Entry]:
    """Every image under root but not under `skip` (as the module docstring says), each captioned by the .txt beside
    it, and every caption that pairs with no image; a symlinked folder out of the root is quarantined."""
    names, entries = _folder_files(root, skip)
    present = set(names)
    images = [name for name in names if _is_image_name(name) or (_pil_reads(name) and _caption_name(name) in present)]
    for name in images:
        try:
            image = resolve_inside(root, name)
            entries.append(Entry(name, image, *_sidecar_caption(root, image.with_suffix(CAPTION_EXTENSION))))
        except Rejected as problem:
            entries.append(Entry(name, None, None, problem))
    return entries + _captions_without_image(names, images)


def _captions_without_image(names: list[str], images: list[str]) -> list[Entry]:
    """A left-out entry for each .txt that captions none of `images`, naming the other files of its stem."""
    paired = {_caption_name(name) for name in images}
    unread = defaultdict(list)  # the files that are neither an image nor a caption, by stem
    for name in sorted(set(names) - set(images)):
        if not name.endswith(CAPTION_EXTENSION):
            unread[_stem(name)].append(name)
    entries = []
    for name in names:
        if name.endswith(CAPTION_EXTENSION) and name not in paired:
            beside = unread.get(_stem(name))
            detail = (f"beside it: {', '.join(beside)}, not an image t2i reads" if beside
                      else "no file of its name beside it")
            entries.append(Entry(name, None, None, Rejected(CAPTION_WITHOUT_IMAGE, detail)))
    return entries


def _sidecar_caption(root: Path, path: Path) -> tuple[str | None, Rejected | None]:
    if not path.is_file():
        return None, None
    resolve_inside(root, path.relative_to(root).as_posix())
    try:
        return path.read_bytes().decode("utf-8-sig"), None
    except UnicodeDecodeError as error:
        return None, Rejected(CAPTION_NOT_UTF8, str(error))
