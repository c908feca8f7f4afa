"""Model files checked before they are loaded: no pickle unless trusted, and a damaged file named in one line.

A pickle weight file (`.bin`, `.ckpt`, `.pt`, `.pth`) can run code when loaded, so a component whose weights
exist only as pickle is refused unless the user says they trust it. A truncated or corrupt file, or a config that
does not match its weights, would otherwise surface as a long traceback from deep inside diffusers, transformers or
safetensors; here it becomes one T2IError that names the file.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from t2i.errors import T2IError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
# What the loaders raise for unreadable files or configs that do not fit the weights.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError)
REASON_MAX_CHARS = 200


def check_component(folder: Path, root: Path, allow_pickle: bool = False) -> None:
    """Refuse pickle-only weights in `folder`, and check its JSON files and safetensors headers are whole."""
    files = sorted(path for path in folder.iterdir() if path.is_file())
    weights = [path for path in files if path.suffix == SAFETENSORS_SUFFIX]
    pickles = [path for path in files if path.suffix in PICKLE_SUFFIXES]
    if pickles and not weights and not allow_pickle:
        raise T2IError(f"model folder '{root}' holds pickle weights ({_relative(pickles[0], root)}), which can run "
                       "code when loaded; convert them to safetensors, or pass --allow-pickle if you trust the file")
    if not weights and not pickles and any(path.name == "config.json" for path in files):
        raise T2IError(f"'{_relative(folder, root)}' in '{root}' has a config but no weights file "
                       f"(*{SAFETENSORS_SUFFIX}); the model folder is incomplete")
    for path in files:
        if path.suffix == ".json":
            check_json(path, root)
    for path in weights:
        check_safetensors(path, root)


def check_json(path: Path, root: Path) -> dict:
    """The JSON object in `path`, or one line saying that the file is damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise T2IError(f"'{_relative(path, root)}' in '{root}' is damaged: {_reason(error)}") from None
    if not isinstance(value, dict):
        raise T2IError(f"'{_relative(path, root)}' in '{root}' is damaged: it holds a {type(value).__name__}, "
                       "not a JSON object")
    return value


def check_safetensors(path: Path, root: Path) -> None:
    """Open the file's header, which safetensors checks against the file's length (so truncation shows)."""
    try:
        with safe_open(path, framework="pt") as weights:
            weights.keys()
    except (OSError, SafetensorError) as error:
        raise T2IError(f"'{_relative(path, root)}' in '{root}' is damaged (truncated or corrupt): "
                       f"{_reason(error)}") from None


@contextmanager
def loading(root: Path, what: str, *folders: Path) -> Iterator[None]:
    """Turn an error raised while loading `what` from `folders` into one line naming their files."""
    try:
        yield
    except LOAD_ERRORS as error:
        files = sorted(path for folder in folders if folder.is_dir() for path in folder.iterdir() if path.is_file())
        names = ", ".join(_relative(path, root) for path in files)
        raise T2IError(f"could not load the {what} from '{root}' ({names}): its config does not match its "
                       f"weights, or a file is damaged: {_reason(error)}") from None


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    reason = " ".join(lines[:2])  # torch's state-dict errors say what is wrong on their second line
    return reason if len(reason) <= REASON_MAX_CHARS else reason[:REASON_MAX_CHARS] + "…"
