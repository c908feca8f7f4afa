"""Nested state (optimizer, LR scheduler, RNG states) stored as data: tensors in safetensors, the rest in JSON.

`torch.save` writes pickle, and unpickling a file can run any code it names. Run folders travel between people
and machines, so t2i stores no pickle: `save_state` splits a state into NAME.safetensors (every tensor) and
NAME.json (the structure, with each tensor replaced by its key), and `load_state` joins them again. JSON has
no tuples, non-string keys or non-finite floats, so those are tagged.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_TENSOR, _TUPLE, _ITEMS, _FLOAT, _ARRAY = "__tensor__", "__tuple__", "__items__", "__float__", "__ndarray__"


def save_state(state: Any, folder: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, name)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(structure, allow_nan=False))


def load_state(folder: Path, name: str) -> Any:
    """The state `save_state` wrote; raises OSError, SafetensorError or ValueError on a damaged file."""
    tensors = load_file(folder / f"{name}.safetensors")
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


def state_files(name: str) -> tuple[str, str]:
    return f"{name}.safetensors", f"{name}.json"


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors, path)
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {_ITEMS: [[_encode(key, tensors, f"{path}.key{i}"), _encode(item, tensors, f"{path}.{i}")]
                         for i, (key, item) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at '{path}' as plain data")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _ARRAY in value:
        return np.asarray(value[_ARRAY], dtype=value["dtype"])
    if _TUPLE in value:
        return tuple(_decode(item, tensors) for item in value[_TUPLE])
    if _ITEMS in value:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value[_ITEMS]}
    if _FLOAT in value:
        return float(value[_FLOAT])
    return {key: _decode(item, tensors) for key, item in value.items()}
