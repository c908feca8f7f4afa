"""Training checkpoints: data, not code. safetensors weights (model and EMA), optimizer, LR-scheduler and RNG
states as safetensors + JSON (no pickle, see plain_state.py), the step and the resolved config, in a folder
that exists only once complete."""
from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from t2i.atomic import write_folder
from t2i.errors import T2IError
from t2i.training.plain_state import load_state, save_state, state_files

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
_COMPLETE = re.compile(rf"{STEP_PREFIX}\d+")
MODEL, EMA, TRAINER_STATE, CONFIG = "model.safetensors", "ema.safetensors", "trainer_state.json", "config.json"
OPTIMIZER, RNG = "optimizer", "rng"  # plain_state names: optimizer.safetensors + optimizer.json, ...
LEGACY_PICKLES = ("optimizer.pt", "rng.pt")  # written by t2i before checkpoints held no pickle


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the model: where it was and what its RNGs held."""

    step: int
    micro_batches: int
    # Optimiser steps skipped for a non-finite loss or gradient (see TrainConfig.max_nonfinite_steps).
    skipped_steps: int = 0
    # Seconds of training up to this step, over every resumed part, so that metrics.jsonl's elapsed_s goes on
    # from where the run stopped.
    elapsed_s: float = 0.0
    # The processes that shared every micro-batch; None in a checkpoint written before t2i recorded it (its config's
    # local_processes then tells).
    processes: int | None = None


class CheckpointError(T2IError):
    """A checkpoint that cannot be resumed from; the message says which file and what to do instead."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"{STEP_PREFIX}{step:07d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written `.tmp` folders are not among them."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _COMPLETE.fullmatch(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step."""
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def save_checkpoint(run_dir: Path, state: TrainingState, model: torch.nn.Module, ema_weights: dict | None,
                    optimizer: torch.optim.Optimizer, lr_scheduler, config: dict, keep: int) -> Path:
    final = checkpoint_dir(run_dir, state.step)
    with write_folder(final, "checkpoint") as staging:
        save_file(_tensors(model.state_dict()), staging / MODEL)
        if ema_weights is not None:
            save_file(_tensors(ema_weights), staging / EMA)
        save_state({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()},
                   staging, OPTIMIZER)
        save_state(_rng_states(), staging, RNG)
        (staging / TRAINER_STATE).write_text(json.dumps(state.__dict__, indent=2))
        (staging / CONFIG).write_text(json.dumps(config, indent=2))
    _prune(run_dir, keep)
    return final


def batch_split(folder: Path, state: TrainingState, stage: str) -> tuple[int, int]:
    """(processes, images per process) of each micro-batch of the run that wrote the checkpoint at `folder`."""
    with _reading(folder, CONFIG):
        config = json.loads((folder / CONFIG).read_text())
        return state.processes or config.get("local_processes", 1), config["train"][stage]["batch_size"]


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
                    weights_only: bool = False) -> tuple[TrainingState, dict | None]:
    """Restore model, optimizer, scheduler and RNGs in place; return the state and the EMA weights, if any.

    With `weights_only`, only the model, EMA and step are restored: the optimizer starts afresh and the LR
    schedule is set to the step. That continues a run whose optimizer state cannot be read, not exactly.
    """
    if not weights_only and not (folder / state_files(OPTIMIZER)[0]).exists():
        if any((folder / name).exists() for name in LEGACY_PICKLES):
            raise CheckpointError(
                f"checkpoint '{folder}' was written by an older t2i, which stored optimizer and RNG states as pickle "
                "files; t2i no longer unpickles files (they can run code). To continue from its weights, with a "
                "fresh optimizer, rerun with --resume-weights-only")
    with _reading(folder, TRAINER_STATE):
        state = TrainingState(**json.loads((folder / TRAINER_STATE).read_text()))
    with _reading(folder, MODEL):
        weights = load_file(folder / MODEL)
    _load_weights(model, weights, folder)
    ema_weights = None
    if (folder / EMA).is_file():
        with _reading(folder, EMA):
            ema_weights = load_file(folder / EMA)
    if weights_only:
        _set_schedule_step(lr_scheduler, state.step)
        return state, ema_weights
    with _reading(folder, *state_files(OPTIMIZER)):
        saved = load_state(folder, OPTIMIZER)
        optimizer.load_state_dict(saved["optimizer"])
        _match_parameter_layouts(optimizer)
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
    with _reading(folder, *state_files(RNG)):
        _set_rng_states(load_state(folder, RNG))
    return state, ema_weights


@contextmanager
def _reading(folder: Path, *names: str):
    """Turns a damaged checkpoint file into one line naming it and the earlier checkpoint to fall back on."""
    try:
        yield
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as error:
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            problem, name = "is missing", missing[0]
        else:
            problem, name = f"is corrupt or truncated ({_first_line(error)})", _damaged(names, error)
        raise CheckpointError(f"checkpoint file '{folder / name}' {problem}; {_fallback_hint(folder)}") from None


def _damaged(names: tuple[str, ...], error: BaseException) -> str:
    """Which of the files read together failed, as the error's type tells."""
    suffix = {SafetensorError: ".safetensors", json.JSONDecodeError: ".json", UnicodeDecodeError: ".json"}
    for kind, ending in suffix.items():
        if isinstance(error, kind):
            return next((name for name in names if name.endswith(ending)), names[0])
    return " + ".join(names)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def _fallback_hint(folder: Path) -> str:
    earlier = [c for c in complete_checkpoints(folder.parent.parent) if c.name < folder.name]
    if earlier:
        return (f"the previous complete checkpoint is '{earlier[-1]}': move '{folder}' out of the way and "
                "rerun with --resume to continue from it")
    return f"there is no earlier checkpoint: move '{folder}' out of the way and rerun to start the stage afresh"


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], folder: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"the weights in '{folder / MODEL}' do not fit the configured model (was the config "
                              f"changed since?): {_first_line(error)}") from None


def _set_schedule_step(lr_scheduler, step: int) -> None:
    """Put the LR schedule where `step` optimiser steps would have left it."""
    lr_scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        lr_scheduler.step()


def _prune(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded state tensor its parameter's memory layout (a channels_last weight's moments are saved
    contiguous): fused and foreach optimizers walk parameter and state memory in step, element by element."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if (isinstance(value, torch.Tensor) and value.shape == parameter.shape
                        and value.stride() != parameter.stride()):
                    optimizer.state[parameter][key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
