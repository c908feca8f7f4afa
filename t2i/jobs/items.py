"""Prompt files (.txt, .jsonl, .csv) -> validated items, each with a stable id, and the images they ask for.

An item's id is given, or derived from its content (and, for repeated lines, which repeat it is), never from
its position, so reordering a file changes no id. An image's seed is given (item seed + k) or derived from the
job seed, the item id and k. Prompts are data: they never become file names; ids are checked to be safe ones.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from t2i.diffusion.sampler_names import SAMPLER_NAMES
from t2i.errors import T2IError

FIELDS = ("id", "prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "height", "width", "num_images")
INT_FIELDS = ("seed", "steps", "height", "width", "num_images")
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DERIVED_ID_LENGTH = 12  # hex digits of sha256: collisions need ~16 M items
MAX_SEED = 2**31 - 1
OPTION_OF_FIELD = {"negative_prompt": "negative"}  # `t2i batch --negative`: the rest are the field's name
# A job's images are planned in memory (about 0.25 kB each) and listed in one manifest and one gallery page, so a
# typo such as num_images 100000000 would otherwise exhaust memory before the first image.
MAX_IMAGES_PER_ITEM = 10_000
MAX_IMAGES_PER_JOB = 1_000_000


@dataclass(frozen=True)
class JobDefaults:
    """Values for fields an item leaves out: the command line's, else the pipeline's saved defaults."""

    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    height: int
    width: int
    num_images: int


@dataclass(frozen=True)
class Item:
    id: str
    line: int
    prompt: str
    negative_prompt: str
    seed: int | None  # None: each image's seed is derived from the job seed and the id
    steps: int
    guidance: float
    sampler: str
    height: int
    width: int
    num_images: int


@dataclass(frozen=True)
class ImageTask:
    """One image to make: everything that decides its pixels, and where it goes."""

    id: str
    k: int
    seed: int
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    sampler: str
    height: int
    width: int

    @property
    def file(self) -> str:
        return f"images/{self.id}-{self.k}.png"

    @property
    def group(self) -> tuple:
        """Images with equal groups can share a batch."""
        return (self.height, self.width, self.steps, self.sampler, self.guidance)

    def parameters(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def derived_seed(job_seed: int, item_id: str, k: int) -> int:
    digest = hashlib.sha256(f"{job_seed}/{item_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & MAX_SEED


def image_tasks(item: Item, job_seed: int) -> list[ImageTask]:
    tasks = []
    for k in range(item.num_images):
        seed = item.seed + k if item.seed is not None else derived_seed(job_seed, item.id, k)
        tasks.append(ImageTask(item.id, k, seed, item.prompt, item.negative_prompt, item.steps, item.guidance,
                               item.sampler, item.height, item.width))
    return tasks


def read_items(path: Path, defaults: JobDefaults, latent_factor: int) -> tuple[list[Item], list[Problem]]:
    """Every valid item of the file, and every problem with its line number (the file's own numbering)."""
    rows, problems = read_rows(path)
    items: list[Item] = []
    first_of_id: dict[str, Item] = {}  # by the id in lower case: 'Red' and 'red' name one file on macOS and Windows
    repeats: dict[str, int] = {}
    for line, fields in rows:
        try:
            item = _make_item(line, fields, defaults, latent_factor, repeats)
        except ValueError as error:
            problems.append(Problem(line, str(error)))
            continue
        first = first_of_id.setdefault(item.id.lower(), item)
        if first is not item:
            problems.append(Problem(line, _duplicate_id(item.id, first)))
            continue
        items.append(item)
    problems.sort(key=lambda problem: problem.line)
    return items, problems


def _duplicate_id(item_id: str, first: Item) -> str:
    if item_id == first.id:
        return f"duplicate id {item_id!r} (first on line {first.line})"
    return (f"id {item_id!r} differs from id {first.id!r} (line {first.line}) only in case; their images would be one "
            "file on macOS and Windows")


def read_rows(path: Path) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """(line number, raw fields) per non-blank line, and the lines that could not be read at all."""
    if path.is_dir():
        raise T2IError(f"prompt file '{path}' is a folder; give a .txt, .jsonl or .csv file")
    if not path.is_file():
        raise T2IError(f"prompt file '{path}' does not exist")
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    suffix = path.suffix.lower()  # PROMPTS.TXT too: Windows tools and old archives write upper-case names
    if suffix not in readers:
        raise T2IError(f"prompt file '{path}' must end in .txt, .jsonl or .csv (in any case)")
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Windows PowerShell 5's `>` and "Unicode" saves
        raise T2IError(f"prompt file '{path}' is UTF-16 text; save it as UTF-8 (e.g. Notepad: Save as, Encoding "
                       "UTF-8)")
    try:
        return readers[suffix](data.decode("utf-8-sig"))  # -sig: drop a byte-order mark (Excel)
    except UnicodeDecodeError as error:
        raise T2IError(f"prompt file '{path}' is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _lines(text: str) -> list[str]:
    """The file's lines, split at \n, \r\n or \r only: str.splitlines() also splits at U+2028, NEL, form feeds
    and other separators that may sit inside a prompt (raw in JSON strings too), and would misnumber lines."""
    return re.split(r"\r\n|\r|\n", text)


def is_prompt_line(line: str) -> bool:
    """In a one-prompt-a-line file (a .txt prompt file, finetune's --validation-prompts), blank lines and comment
    lines (first non-blank character '#') hold no prompt. A prompt that starts with '#' is written in .jsonl or
    .csv, whose formats have no comments."""
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _read_txt(text: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    return [(number, {"prompt": line.strip()}) for number, line in enumerate(_lines(text), 1)
            if is_prompt_line(line)], []


def _read_jsonl(text: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    rows, problems = [], []
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(Problem(number, f"not valid JSON ({error.msg} at column {error.colno})"))
            continue
        if not isinstance(fields, dict):
            problems.append(Problem(number, f"expected a JSON object, got {type(fields).__name__}"))
            continue
        rows.append((number, fields))
    return rows, problems


def _read_csv(text: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": a quoted cell keeps its line breaks
    header = next(reader, None)
    if header is None:
        return [], []
    header = [name.strip().lower() for name in header]  # "Prompt", "Seed": spreadsheets capitalise headings
    unknown = [name for name in header if name not in FIELDS]
    if unknown:
        hint = "; the file looks semicolon-separated: save it comma-separated" if ";" in unknown[0] else ""
        return [], [Problem(1, f"unknown column {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}{hint}")]
    rows, problems = [], []
    for cells in reader:
        number = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            hint = "; put a cell that holds a comma in double quotes" if len(cells) > len(header) else ""
            cell_count = f"{len(cells)} cell{'' if len(cells) == 1 else 's'}"
            problems.append(Problem(number, f"{cell_count} for {len(header)} columns{hint}"))
            continue
        fields = {}
        for name, cell in zip(header, cells):
            if cell.strip():
                fields[name] = _csv_value(name, cell.strip())
        rows.append((number, fields))
    return rows, problems


def _csv_value(name: str, cell: str):
    """CSV cells are strings; numbers are parsed here so that type errors read the same as in JSONL."""
    try:
        if name in INT_FIELDS:
            return int(cell)
        if name == "guidance":
            return float(cell)
    except ValueError:
        return cell
    return cell


def check_job_size(items: list[Item], path: Path) -> None:
    """Refuse, before any work, a file that asks for more images than one job's output folder holds."""
    total = sum(item.num_images for item in items)
    if total > MAX_IMAGES_PER_JOB:
        raise T2IError(f"prompt file '{path}' asks for {total:,} images, more than the {MAX_IMAGES_PER_JOB:,} one job "
                       "makes; split it into several files, each with its own --out")


def check_defaults(defaults: JobDefaults, latent_factor: int) -> None:
    """The job's own values (command-line options, else the pipeline's), checked once: a bad one is named as an
    option rather than reported on every line of the prompt file that leaves the field out."""
    try:
        _make_item(0, {"prompt": "-"}, defaults, latent_factor, {})
    except ValueError as error:
        option = OPTION_OF_FIELD.get(str(error).split()[0], str(error).split()[0].replace("_", "-"))
        raise T2IError(f"--{option}: {error}") from None


def _make_item(line: int, fields: dict, defaults: JobDefaults, latent_factor: int, repeats: dict) -> Item:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("empty prompt" if prompt in (None, "") or isinstance(prompt, str) else
                         f"prompt must be a string, got {type(prompt).__name__}")
    negative = fields.get("negative_prompt", defaults.negative_prompt)
    if not isinstance(negative, str):
        raise ValueError(f"negative_prompt must be a string, got {type(negative).__name__}")
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        _check_encodable(name, text)
    for name in INT_FIELDS:
        if name in fields and (not isinstance(fields[name], int) or isinstance(fields[name], bool)):
            raise ValueError(f"{name} must be an integer, got {fields[name]!r}")
    seed = fields.get("seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} is outside 0..{MAX_SEED}")
    steps = fields.get("steps", defaults.steps)
    if steps <= 0:
        raise ValueError(f"steps must be at least 1, got {steps}")
    guidance = fields.get("guidance", defaults.guidance)
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    sampler = fields.get("sampler", defaults.sampler)
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    height, width = fields.get("height", defaults.height), fields.get("width", defaults.width)
    for name, value in (("height", height), ("width", width)):
        if value < latent_factor or value % latent_factor:
            raise ValueError(f"{name} {value} is not a positive multiple of the VAE's latent factor {latent_factor}")
    num_images = fields.get("num_images", defaults.num_images)
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if num_images > MAX_IMAGES_PER_ITEM:
        raise ValueError(f"num_images {num_images} is above the limit of {MAX_IMAGES_PER_ITEM:,} images per item")
    item_id = _checked_id(fields["id"]) if "id" in fields else _derived_id(fields, repeats)
    return Item(item_id, line, prompt, negative, seed, steps, float(guidance), sampler, height, width, num_images)


def _check_encodable(name: str, text: str) -> None:
    """A lone surrogate (JSON's "\\ud800" without its pair, or a non-UTF-8 byte in a command-line argument) has no
    UTF-8 form, so it could be neither embedded in a PNG nor written to the manifest."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} is not valid Unicode: lone surrogate {text[error.start]!r} at character "
                         f"{error.start + 1}") from None


def _checked_id(item_id) -> str:
    if not isinstance(item_id, str) or not SAFE_ID.fullmatch(item_id) or ".." in item_id:
        raise ValueError(f"id {item_id!r} is not a safe file name: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit, without '..'")
    return item_id


def _derived_id(fields: dict, repeats: dict) -> str:
    """A short hash of the item's own fields; the n-th repeat of identical fields hashes n in too."""
    content = json.dumps({key: value for key, value in fields.items() if key != "id"}, sort_keys=True)
    repeat = repeats.get(content, 0)
    repeats[content] = repeat + 1
    salted = content if repeat == 0 else f"{content}#{repeat}"
    return hashlib.sha256(salted.encode()).hexdigest()[:DERIVED_ID_LENGTH]
