"""Bad input never breaks a run and never hides: each bad entry is skipped, named in quarantine.jsonl, counted.

    run_dir/quarantine.jsonl    one JSON object per bad entry: {"file": ..., "reason": ...[, "detail": ...]}

A map-style source is scanned whole at every start, so its quarantine.jsonl is rewritten whole by each scan
(`write_quarantine`): it lists what the current files hold, never what a run before them found. A stream meets its
entries as it goes, so its file grows as they are met (`Quarantine` with a path).

The reasons are the fixed strings below, so that reports can count them and tests can match them. The reasons in
`LEFT_OUT` name files that are not broken, only not part of the data as the folder describes it: they are counted
and listed all the same, each kind in a note of its own, but not against `data.max_bad_fraction`.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from t2i.atomic import write_file
from t2i.errors import T2IError, first_few

QUARANTINE_FILE = "quarantine.jsonl"

# Files
MISSING_FILE = "missing file"
NOT_A_FILE = "not a regular file"
ESCAPES_ROOT = "escapes dataset root"
ZERO_BYTE = "zero-byte file"
NOT_AN_IMAGE = "not an image"
TRUNCATED = "truncated image"
UNREADABLE = "unreadable image"
DECOMPRESSION_BOMB = "decompression bomb"
TOO_SMALL = "image too small"
MISSING_IMAGE = "missing image"
# Captions
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_UTF8 = "caption not UTF-8"
CAPTION_TOO_LONG = "caption too long"
BAD_METADATA_ROW = "unreadable metadata row"
DUPLICATE_ROW = "duplicate metadata row"
# Tar shards
UNREADABLE_SHARD = "unreadable shard"
# Left out
NOT_IN_METADATA = "not in metadata"
CAPTION_WITHOUT_IMAGE = "caption without image"
RUN_FOLDER = "t2i run folder"

# Each left-out reason's note, for one entry and for several; a metadata file may list a chosen subset on purpose.
LEFT_OUT = {
    NOT_IN_METADATA: ("image in the folder is not in its metadata file and was left out",
                      "images in the folder are not in its metadata file and were left out"),
    CAPTION_WITHOUT_IMAGE: ("caption file has no image beside it that t2i reads and was left out",
                            "caption files have no image beside them that t2i reads and were left out"),
    RUN_FOLDER: ("folder is a t2i run's output (its sample grids are not training images) and was left out",
                 "folders are t2i runs' outputs (their sample grids are not training images) and were left out"),
}


class Rejected(Exception):
    """One entry is bad, for `reason` (one of the strings above); the scan quarantines it and goes on."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class QuarantineEntry:
    file: str
    reason: str
    detail: str = ""

    def to_json(self) -> str:
        record = {"file": self.file, "reason": self.reason}
        if self.detail:
            record["detail"] = self.detail
        return json.dumps(record, ensure_ascii=False)


class Quarantine:
    """Collects bad entries, each (file, reason) once; with a path (a stream's), appends each to it as it is met.

    A scan's quarantine has no path: `write_quarantine` writes its entries whole once the scan is done. A streamed
    source meets the same bad member every epoch: it is counted and written once. Entries already in an existing
    file (a resumed run) are not written twice. Pass `path=None` on every process but the main one: the counts stay
    the same there, and only one process writes.
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: list[QuarantineEntry] = []
        self._met: set[tuple[str, str]] = set()
        self._written: set[tuple[str, str]] = set()
        if path is not None and path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            kept = []
            for line in lines:
                try:
                    record = json.loads(line)
                    self._written.add((record["file"], record["reason"]))
                    kept.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill: dropped, written again
                    continue
            if len(kept) != len(lines):
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def add(self, file: str, reason: str, detail: str = "") -> None:
        if (file, reason) in self._met:
            return
        self._met.add((file, reason))
        entry = QuarantineEntry(file, reason, detail)
        self.entries.append(entry)
        if self.path is None or (file, reason) in self._written:
            return
        self._written.add((file, reason))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(entry.to_json() + "\n")

    @property
    def counts(self) -> Counter[str]:
        return Counter(entry.reason for entry in self.entries)


def left_out_notes(entries: list[QuarantineEntry]) -> list[str]:
    """One line for each left-out reason met: how many, why, and the first few names."""
    notes = []
    for reason, (one, several) in LEFT_OUT.items():
        names = [entry.file for entry in entries if entry.reason == reason]
        if names:
            notes.append(f"data: {len(names)} {one if len(names) == 1 else several}: {first_few(names)}")
    return notes


def write_quarantine(path: Path, entries: list[QuarantineEntry]) -> None:
    """Replace the file at `path` with a scan's `entries` in one rename, or remove it when there are none."""
    if not entries:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_file(path) as draft:
        draft.write_text("".join(entry.to_json() + "\n" for entry in entries), encoding="utf-8")


@dataclass
class ScanReport:
    """What a scan of the data found: good entries kept, bad and left-out ones skipped by reason."""

    kept: int
    skipped: Counter[str] = field(default_factory=Counter)
    quarantine_path: Path | None = None
    # Set for a streamed source: its entries are checked as they are met, so at start only the shards are known.
    shards: int | None = None
    notes: list[str] = field(default_factory=list)  # printed after the summary: the left-out files
    images: int | None = None  # distinct images among the kept samples, when several captions make them fewer

    @property
    def bad(self) -> int:
        return sum(count for reason, count in self.skipped.items() if reason not in LEFT_OUT)

    @property
    def total(self) -> int:
        """The entries that count towards the bad fraction: the kept and the bad, not the left out."""
        return self.kept + self.bad

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def summary(self) -> str:
        """The one line printed at start: "data: 97 images, 6 skipped (truncated image: 2, ...); see ..."."""
        if self.shards is not None:
            where = f" to {self.quarantine_path}" if self.quarantine_path is not None else ""
            return f"data: {self.shards} tar shards, streamed; bad members go{where} as they are met"
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
        where = f"; see {self.quarantine_path}" if skipped and self.quarantine_path is not None else ""
        kept = (f"{self.kept} images" if self.images in (None, self.kept)
                else f"{self.kept} samples from {self.images} images")
        return f"data: {kept}, {skipped} skipped" + (f" ({reasons})" if skipped else "") + where

    def check(self, max_bad_fraction: float) -> None:
        """Stop, with a clear message, when too much of the data is bad: it is then likely the wrong data."""
        if self.kept == 0 and not self.skipped:
            raise T2IError("data: no images found; check data.path")
        where = f" (listed in {self.quarantine_path})" if self.quarantine_path is not None else ""
        if self.bad_fraction > max_bad_fraction:
            raise T2IError(f"data: {self.bad} of {self.total} entries are bad{where}, more than "
                           f"data.max_bad_fraction = {max_bad_fraction:g}; fix them or raise the limit")
        if self.kept == 0:
            raise T2IError(f"data: every entry was skipped{where}; nothing is left to train on")
