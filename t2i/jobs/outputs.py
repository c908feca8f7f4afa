"""A job's output folder: images/, manifest shards and manifest.jsonl, job.json.

Every file a reader may trust is complete: images and whole files are written to a temporary name in the
same folder and renamed; manifest lines are appended one whole line at a time, and a cut last line (a crash
mid-write) is dropped and rebuilt from the image it names.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

from t2i.errors import T2IError

IMAGES = "images"
MANIFEST = "manifest.jsonl"
JOB = "job.json"
TEMPORARY_SUFFIX = ".tmp"


def shard_name(rank: int) -> str:
    return f"manifest.rank-{rank}.jsonl"


def png_bytes(image, parameters: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def temporary_path(path: Path) -> Path:
    """Hidden, beside `path`, and the same for every try: only the process that owns the image writes it."""
    return path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all; a failed write (a full disk) leaves no temporary behind."""
    staging = temporary_path(path)
    try:
        with open(staging, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise write_failed(path, error) from None


def write_failed(path: Path, error: OSError) -> T2IError:
    """A one-line error for a write the disk refused (full, read-only, permissions)."""
    return T2IError(f"could not write '{path}': {error.strerror or error}; make room or fix the folder, then rerun the "
                    "same command (everything written so far is kept)")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of_file(path: Path) -> str:
    return sha256_of(path.read_bytes())


class ManifestShard:
    """One process's append-only manifest: one JSON line per finished image."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as error:
            raise write_failed(path, error) from None

    def append(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        except OSError as error:
            raise write_failed(self.path, error) from None

    def close(self) -> None:
        """Close the file; a line that a full disk cut short is dropped by the next run (repair_shard)."""
        try:
            self._file.close()
        except OSError as error:
            raise write_failed(self.path, error) from None


def read_records(path: Path) -> tuple[list[dict], bool]:
    """The whole records of a manifest file, and whether a cut or garbled line was dropped."""
    if not path.is_file():
        return [], False
    records, damaged = [], False
    # Lines end in "\n" alone: str.splitlines() would also cut at U+2028, NEL or \x1c inside a prompt (written raw,
    # ensure_ascii=False), dropping that image's record from every merge.
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged = True
            continue
        if isinstance(record, dict) and {"id", "k", "file", "sha256"} <= set(record):
            records.append(record)
        else:
            damaged = True
    return records, damaged


def manifest_files(out: Path) -> list[Path]:
    return [out / MANIFEST, *sorted(out.glob("manifest.rank-*.jsonl"))]


def all_records(out: Path) -> dict[tuple[str, int], dict]:
    """(id, k) -> its latest record over manifest.jsonl and every shard."""
    records = {}
    for path in manifest_files(out):
        for record in read_records(path)[0]:
            records[(record["id"], record["k"])] = record
    return records


def repair_shard(path: Path) -> None:
    """Rewrite a shard without its cut or garbled lines; the images they named are re-recorded from the files."""
    records, damaged = read_records(path)
    if damaged:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        write_atomically(path, lines.encode())


def check_output_folder(out: Path) -> None:
    """Refuse a path that is not a batch job's output folder: missing, a file, or a folder of something else."""
    if out.is_file():
        raise T2IError(f"'{out}' is a file; give the --out folder of a t2i batch job")
    if not out.is_dir():
        raise T2IError(f"output folder '{out}' does not exist")
    if not ((out / JOB).is_file() or (out / IMAGES).is_dir() or any(path.is_file() for path in manifest_files(out))):
        raise T2IError(f"'{out}' is not a batch job's output folder (it has no {JOB}, {IMAGES}/ or manifest); "
                       "give the --out folder of a t2i batch job")


def merge_manifests(out: Path, wanted: set[tuple[str, int]] | None = None) -> list[dict]:
    """Fold every shard into manifest.jsonl (records of existing images, sorted by id and k, and only those whose
    (id, k) is `wanted` if given); drop the shards. `out` is a job's folder: its job made it, or `t2i batch
    --merge` checked it (`check_output_folder`)."""
    records = [record for key, record in all_records(out).items()
               if (out / record["file"]).is_file() and (wanted is None or key in wanted)]
    records.sort(key=lambda record: (record["id"], record["k"]))
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    write_atomically(out / MANIFEST, lines.encode())
    for shard in out.glob("manifest.rank-*.jsonl"):
        shard.unlink()
    return records


def unlisted_images(out: Path, records: list[dict]) -> list[str]:
    """Finished images in images/ (not temporaries) that no record lists, by name."""
    listed = {record["file"] for record in records}
    return sorted(path.name for path in (out / IMAGES).glob("*.png")
                  if not path.name.startswith(".") and f"{IMAGES}/{path.name}" not in listed)


def make_images_folder(out: Path) -> None:
    """OUT/images/, or one line when a file holds its name (mkdir's FileExistsError was a traceback)."""
    folder = out / IMAGES
    if folder.exists() and not folder.is_dir():
        raise T2IError(f"'{folder}' is a file; t2i batch writes its images into a folder of that name: move the file "
                       "away or give another --out")
    folder.mkdir(parents=True, exist_ok=True)


def check_job_file(out: Path, job: dict, force: bool) -> None:
    """Refuse to add to a folder made with another model, other defaults or another number format, unless forced.

    A key the folder's job.json lacks (written by an older t2i) is not checked."""
    path = out / JOB
    if force or not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise T2IError(f"'{path}' is not valid JSON; fix it or pass --force to overwrite it") from None
    if not isinstance(previous, dict):
        raise T2IError(f"'{path}' is not a job record (a JSON object); fix it or pass --force to overwrite it")
    changed = [key for key in ("model_hash", "defaults", "dtype") if key in previous and previous[key] != job[key]]
    if not changed:
        return
    details = "; ".join(f"{key}: was {previous[key]}, now {job[key]}" for key in changed)
    remedy = f"rerun with --dtype {previous['dtype']}, " if changed == ["dtype"] else ""
    raise T2IError(f"'{out}' holds a job made with other settings ({details}); {remedy}use another --out, or "
                   "--force to go on with the new settings (images already made are kept as they are, unless their "
                   "own parameters changed)")


def write_job_file(out: Path, job: dict) -> None:
    write_atomically(out / JOB, (json.dumps(job, indent=2) + "\n").encode())
