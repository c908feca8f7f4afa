"""Where a model named by the user lives: a local folder, or (when online) a Hugging Face hub repository, of which
only safetensors weights, configs and tokenizer files are fetched."""
from __future__ import annotations

import re
from pathlib import Path

from t2i.errors import T2IError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FETCHED = ["*.json", "*.txt", "*.safetensors", "tokenizer/*", "scheduler/*"]


def is_hub_name(name: str | Path) -> bool:
    """Could `name` be a hub repository (`owner/name`), to fetch when no local folder has that path?"""
    return _HUB_ID.fullmatch(str(name)) is not None


def resolve_model(name: str | Path) -> Path:
    """A local pipeline folder for `name`: the folder itself, or a hub snapshot of `owner/name`."""
    path = Path(name)
    if path.exists() or not is_hub_name(name):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), allow_patterns=_FETCHED))
    except Exception as error:  # offline, unknown repository, no permission: all one line for the user
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise T2IError(f"'{name}' is no local folder, and fetching it from the Hugging Face hub failed: {first}") \
            from None
